"""``medgmae demo [CT] [--out DIR]``: mask a CT, predict Gaussians, render, and write NIfTI / PLY / .mrb / PNG.

With no CT the built-in procedural phantom (``data.phantom.make_phantom``) is used. The CT is read with the one
reader every command uses (``data.readers.read_ct``), its prepared size is estimated and refused above
``--max-voxels`` (``data.transforms.check_resample_size``), all before the output folder is created. It is then
prepared like the model's training data (RAS, 1.5 mm, HU window), cut into non-overlapping model windows
(``inference.predict_volume`` with ``overlap=0``, so each voxel has one mask and one prediction), and each window
is masked (random 12^3 patches at ``--mask-ratio``) and run through the model's full forward pass. Outputs, in
``--out`` (default ``./medgmae_demo``; all of them or none: they are staged in a hidden folder and moved into place at the end):

* ``prediction.nii.gz``: the rendered Gaussians, in HU (window [-175, 250] undone), resampled (trilinear) onto
  the input CT's exact grid and affine;
* ``mask.nii.gz``: 1 where a patch was hidden from the encoder, on the input CT's grid (nearest neighbour);
* ``gaussians.ply``: every predicted Gaussian, 3DGS-style, in RAS mm;
* ``scene.mrb``: Slicer scene with the CT, the mask label map, the prediction and the ellipsoid glyph model;
* ``overview.png``: axial / coronal / sagittal slices (on the model grid) with Gaussian outlines and a 3D view;
* with ``--model-grid``: ``prediction_model_grid.nii.gz`` and ``mask_model_grid.nii.gz``, the same on the
  prepared model grid (RAS, ``--spacing-mm`` mm), where the model actually worked.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import inference, spatial
from ..data.phantom import make_phantom
from ..data.readers import read_ct
from ..data.transforms import HU_WINDOW, check_resample_size
from ..data.volumes import resample_linear, resample_nearest
from ..errors import OutputError, StagedOutputs, UserError, make_output_dir, os_error_message
from ..export import figures, glyphs, nifti, ply, slicer_scene
from ..progress import ProgressReporter
from ..train.checkpoint import BUNDLED_WEIGHTS, load_model  # BUNDLED_WEIGHTS: the demo's default weights
from .options import add_option

log = logging.getLogger(__name__)

OUTPUT_NAMES = {"prediction": "prediction.nii.gz", "mask": "mask.nii.gz", "ply": "gaussians.ply",
                "scene": "scene.mrb", "png": "overview.png"}
MODEL_GRID_NAMES = {"prediction_model_grid": "prediction_model_grid.nii.gz",
                    "mask_model_grid": "mask_model_grid.nii.gz"}
DEMO_BYTES_PER_VOXEL = 32.0  # prepared volume, prediction, mask, HU copy and writer copies (float32)
STAGES = ("load", "prepare", "predict", "write")
DEFAULT_OUT = "medgmae_demo"  # --out when none is given (relative to the working folder)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ct", nargs="?", default=None,
                        help="CT to use: NIfTI / NRRD / MHA file or DICOM folder (default: the built-in phantom)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT})")
    parser.add_argument("--weights", default=None,
                        help=f"model checkpoint (default: the bundled demo weights {BUNDLED_WEIGHTS.name})")
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches hidden (default 0.75)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the mask and the phantom (default 0)")
    add_option(parser, "--spacing-mm", "--spacing", type=float, default=1.5,
               help="model voxel spacing in mm (default 1.5)")
    parser.add_argument("--max-voxels", type=int, default=None,
                        help="refuse a prepared grid (the CT at --spacing-mm) above this many voxels (default 100 M, "
                             "or less if the memory would not hold it); an explicit value overrides both checks")
    parser.add_argument("--model-grid", action="store_true",
                        help="also write prediction_model_grid.nii.gz and mask_model_grid.nii.gz on the model grid")
    parser.add_argument("--phantom-shape", default="128,128,96",
                        help="shape X,Y,Z of the built-in phantom at 1.5 mm when no CT is given (default 128,128,96)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--glyph-sigma", type=float, default=2.0, choices=(1.0, 2.0, 3.0),
                        help="ellipsoid size in standard deviations (default 2)")
    parser.add_argument("--glyph-threshold", type=float, default=None,
                        help="draw only Gaussians with intensity >= this (default: all)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    parser.add_argument("--progress-json", action="store_true",
                        help="JSON-lines events on stdout (start, progress per stage, done with the outputs, error)")


@dataclass
class DemoResult:
    outputs: dict[str, str]
    timings: dict[str, float]
    source: str
    source_shape: tuple[int, int, int]
    prepared_shape: tuple[int, int, int]
    windows: int
    gaussians: int
    glyphs: int
    weights: str
    extra: dict = field(default_factory=dict)


def resolve_weights(weights: str | Path | None) -> Path:
    path = Path(weights).expanduser() if weights else BUNDLED_WEIGHTS
    if not path.is_file():
        if weights:
            raise FileNotFoundError(f"--weights: checkpoint not found: {path}")
        raise FileNotFoundError(
            f"the bundled demo weights are missing ({path}); pass --weights PATH with a checkpoint from "
            "`medgmae pretrain` (e.g. runs/<name>/last.pt)")
    return path


def parse_shape(text: str | tuple) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in (text.split(",") if isinstance(text, str) else text))
    except ValueError:
        raise ValueError(f"--phantom-shape must be three integers X,Y,Z, got {text!r}") from None
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"--phantom-shape must be three integers X,Y,Z, each >= 8, got {text!r}")
    return shape  # type: ignore[return-value]


def load_ct(ct: str | Path | None, seed: int = 0,
            phantom_shape: tuple[int, int, int] = (128, 128, 96)) -> tuple[np.ndarray, np.ndarray, str]:
    """``(hu [I, J, K], ijk_to_ras, description)``: the file or DICOM folder, or the phantom."""
    if ct is None:
        ph = make_phantom(shape=phantom_shape, seed=seed)
        return ph.hu, np.asarray(ph.affine, dtype=np.float64), f"built-in phantom (seed {seed})"

    path = Path(ct).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"CT not found: {path}")
    hu, affine = read_ct(path, what="CT")  # the one reader: errors name the file; DICOM series are checked
    return hu, affine, str(path)


def check_options(mask_ratio: float, spacing_mm: float, max_voxels: int | None) -> None:
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"--mask-ratio must be in [0, 1), got {mask_ratio}")
    if not (np.isfinite(spacing_mm) and spacing_mm > 0):
        raise ValueError(f"--spacing-mm must be a positive number of mm, got {spacing_mm}")
    if max_voxels is not None and max_voxels < 1:
        raise ValueError(f"--max-voxels must be >= 1, got {max_voxels}")


class _Writing:
    """Turn a failed write of one output into one ``OutputError`` naming it (and that nothing was written)."""

    def __init__(self, name: str, out: Path) -> None:
        self.name, self.out = name, out

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, UserError) or not isinstance(exc, (OSError, RuntimeError)):
            return False
        if isinstance(exc, OSError):
            reason = os_error_message(OSError(exc.errno, exc.strerror, str(self.out / self.name)))
            code = exc.errno
        else:  # slicer-core / torch writers report a full disk as a RuntimeError
            try:
                free = shutil.disk_usage(self.out).free
            except OSError:
                free = -1
            full = 0 <= free < 64 * 2**20
            code = errno.ENOSPC if full else errno.EIO
            reason = (f"cannot write {self.out / self.name}: " + ("disk full" if full else "the write failed")
                      + f" ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})")
        raise OutputError(code, f"{reason}; no demo outputs were written to {self.out}",
                          str(self.out / self.name)) from exc


def run_demo(ct: str | Path | None, out_dir: str | Path, *, weights: str | Path | None = None,
             mask_ratio: float = 0.75, seed: int = 0, spacing_mm: float = 1.5, device: str = "cpu",
             glyph_sigma: float = 2.0, glyph_threshold: float | None = None,
             phantom_shape: tuple[int, int, int] | str = (128, 128, 96), max_voxels: int | None = None,
             model_grid: bool = False, reporter=None) -> DemoResult:
    """The whole demo (module docstring). ``reporter``: an optional ``progress.ProgressReporter`` (4 stages)."""

    check_options(mask_ratio, spacing_mm, max_voxels)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the demo outputs")
    timings: dict[str, float] = {}
    clock = time.perf_counter

    # ---- every input check before anything is written
    t = clock()
    weights_path = resolve_weights(weights)
    shape = parse_shape(phantom_shape)
    hu, affine, source = load_ct(ct, seed, shape)
    what = f"CT {source}" if ct is not None else source
    prepared_shape = check_resample_size(hu.shape, spatial.spacing_of(affine), spacing_mm, max_voxels=max_voxels,
                                         bytes_per_voxel=DEMO_BYTES_PER_VOXEL, what=what)
    timings["load_ct"] = clock() - t
    t = clock()
    model, config = load_model(weights_path, device=device, needed_by="`medgmae demo`")
    if not config.is_gaussian:
        raise ValueError(f"{weights_path}: the demo needs a Gaussian model, this checkpoint is {config.objective!r}")
    timings["load_model"] = clock() - t
    if reporter is not None:
        reporter.start(input=source, weights=str(weights_path), source_shape=list(hu.shape),
                       prepared_shape=list(prepared_shape))
        reporter.progress(1, stage="load")

    t = clock()
    prepared = inference.prepare_ct(hu, affine, spacing_mm=spacing_mm)
    timings["prepare"] = clock() - t
    if reporter is not None:
        reporter.progress(2, stage="prepare")
    t = clock()
    generator = torch.Generator(device=torch.device(device)).manual_seed(seed)
    result = inference.predict_volume(model, prepared, overlap=0, pad_last=True, mask_ratio=mask_ratio,
                                      stitch=True, generator=generator)
    timings["predict"] = clock() - t
    if reporter is not None:
        reporter.progress(3, stage="predict")

    # ---- outputs: staged in a hidden folder inside --out, moved into place only when all are written
    t = clock()
    lo, hi = HU_WINDOW
    pred_hu = (lo + result.pred * (hi - lo)).numpy()
    mask = result.mask.numpy().astype(np.uint8)
    pred_in = resample_linear(pred_hu, prepared.ijk_to_ras, hu.shape, affine)      # the input's exact grid
    mask_in = resample_nearest(mask, prepared.ijk_to_ras, hu.shape, affine, mode="nearest")
    timings["resample_to_input"] = clock() - t
    names = dict(OUTPUT_NAMES, **(MODEL_GRID_NAMES if model_grid else {}))
    finals = {key: out / name for key, name in names.items()}
    make_output_dir(out)
    staged = StagedOutputs(staging_dir=out)
    try:
        paths = {key: staged.path(final) for key, final in finals.items()}
        t = clock()
        with _Writing(names["prediction"], out):
            nifti.write_volume(paths["prediction"], pred_in, affine)
        with _Writing(names["mask"], out):
            nifti.write_volume(paths["mask"], mask_in, affine, kind="mask")
        if model_grid:
            with _Writing(names["prediction_model_grid"], out):
                nifti.write_volume(paths["prediction_model_grid"], pred_hu, prepared.ijk_to_ras)
            with _Writing(names["mask_model_grid"], out):
                nifti.write_volume(paths["mask_model_grid"], mask, prepared.ijk_to_ras, kind="mask")
        with _Writing(names["ply"], out):
            ply.write_gaussians_ply(paths["ply"], result.gaussians, shape=prepared.shape,
                                    ijk_to_ras=prepared.ijk_to_ras)
        timings["write_nifti_ply"] = clock() - t

        t = clock()
        centres_ras, axes_ras = spatial.gaussians_to_world(result.gaussians, prepared.shape, prepared.ijk_to_ras)
        poly = glyphs.gaussian_glyph_polydata(centres_ras, axes_ras, result.gaussians.intensities[0].numpy(),
                                              sigma=glyph_sigma, threshold=glyph_threshold)
        timings["glyphs"] = clock() - t
        t = clock()
        with _Writing(names["scene"], out):
            slicer_scene.write_scene(paths["scene"], ct=(hu, affine), mask=(mask_in, affine),
                                     prediction=(pred_in, affine), glyphs=poly)
        timings["write_scene"] = clock() - t
        t = clock()
        with _Writing(names["png"], out):
            figures.overview_png(paths["png"], ct=prepared.volume, prediction=result.pred.clamp(0, 1),
                                 mask=result.mask, gaussians=result.gaussians, glyph_polydata=poly,
                                 spacing=spatial.spacing_of(prepared.ijk_to_ras), sigma=glyph_sigma,
                                 title=f"MedGMAE demo: {Path(source).name if ct else source}, mask ratio "
                                       f"{mask_ratio:g}, {result.gaussians.num_gaussians} Gaussians "
                                       f"({weights_path.name})")
        timings["write_png"] = clock() - t
        staged.commit()
    finally:
        staged.discard()
    if reporter is not None:
        reporter.progress(4, stage="write")
    timings = {k: round(v, 3) for k, v in timings.items()}
    return DemoResult(outputs={k: str(p) for k, p in finals.items()}, timings=timings, source=source,
                      source_shape=tuple(int(n) for n in hu.shape), prepared_shape=prepared.shape,
                      windows=len(result.grid), gaussians=result.gaussians.num_gaussians,
                      glyphs=poly.GetNumberOfCells() // max(1, glyphs.glyph_counts()[1]), weights=str(weights_path))


def format_summary(res: DemoResult) -> str:
    lines = [f"medgmae demo: {res.source}",
             f"  CT {res.source_shape} -> model grid {res.prepared_shape}, {res.windows} windows, "
             f"{res.gaussians} Gaussians ({res.glyphs} glyphs drawn), weights {res.weights}"]
    lines += [f"  {key:<10} {path}" for key, path in res.outputs.items()]
    lines.append("  timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in res.timings.items()))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    json_lines = bool(getattr(args, "progress_json", False))
    reporter = ProgressReporter("demo", len(STAGES), json_lines=True) if json_lines else None
    res = run_demo(args.ct, args.out, weights=args.weights, mask_ratio=args.mask_ratio, seed=args.seed,
                   spacing_mm=args.spacing_mm, device=args.device, glyph_sigma=args.glyph_sigma,
                   glyph_threshold=args.glyph_threshold, phantom_shape=args.phantom_shape,
                   max_voxels=args.max_voxels, model_grid=args.model_grid, reporter=reporter)
    if reporter is not None:
        reporter.done(**asdict(res))
    else:
        print(json.dumps(asdict(res)) if args.json else format_summary(res))
    return 0
