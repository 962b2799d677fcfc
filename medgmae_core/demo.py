"""``medgmae demo [CT] --out DIR``: mask a CT, predict Gaussians, render, and write NIfTI / PLY / .mrb / PNG.

With no CT the built-in procedural phantom (``data.phantom.make_phantom``) is used. The CT is prepared like the
model's training data (RAS, 1.5 mm, HU window), cut into non-overlapping model windows (``inference.predict_volume``
with ``overlap=0``, so each voxel has one mask and one prediction), and each window is masked (random 12^3
patches at ``--mask-ratio``) and run through the model's full forward pass. Outputs, in ``--out``:

* ``prediction.nii.gz``: the rendered Gaussians, in HU (window [-175, 250] undone), on the prepared grid;
* ``mask.nii.gz``: 1 where a patch was hidden from the encoder;
* ``gaussians.ply``: every predicted Gaussian, 3DGS-style, in RAS mm;
* ``scene.mrb``: Slicer scene with the CT, the mask label map, the prediction and the ellipsoid glyph model;
* ``overview.png``: axial / coronal / sagittal slices with Gaussian outlines and a 3D view of the glyphs.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

BUNDLED_WEIGHTS = Path(__file__).resolve().parent / "weights" / "demo_tiny.pt"
OUTPUT_NAMES = {"prediction": "prediction.nii.gz", "mask": "mask.nii.gz", "ply": "gaussians.ply",
                "scene": "scene.mrb", "png": "overview.png"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ct", nargs="?", default=None,
                        help="CT to use: NIfTI / NRRD / MHA file or DICOM folder (default: the built-in phantom)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--weights", default=None,
                        help=f"model checkpoint (default: the bundled demo weights {BUNDLED_WEIGHTS.name})")
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches hidden (default 0.75)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the mask and the phantom (default 0)")
    parser.add_argument("--spacing", type=float, default=1.5, help="model voxel spacing in mm (default 1.5)")
    parser.add_argument("--phantom-shape", default="128,128,96",
                        help="shape X,Y,Z of the built-in phantom at 1.5 mm when no CT is given (default 128,128,96)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--glyph-sigma", type=float, default=2.0, choices=(1.0, 2.0, 3.0),
                        help="ellipsoid size in standard deviations (default 2)")
    parser.add_argument("--glyph-threshold", type=float, default=None,
                        help="draw only Gaussians with intensity >= this (default: all)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line")


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
    if len(shape) != 3:
        raise ValueError(f"--phantom-shape must be three integers X,Y,Z, got {text!r}")
    return shape  # type: ignore[return-value]


def load_ct(ct: str | Path | None, seed: int = 0,
            phantom_shape: tuple[int, int, int] = (128, 128, 96)) -> tuple[np.ndarray, np.ndarray, str]:
    """``(hu [I, J, K], ijk_to_ras, description)``: the file or DICOM folder, or the phantom."""
    if ct is None:
        from .data.phantom import make_phantom

        ph = make_phantom(shape=phantom_shape, seed=seed)
        return ph.hu, np.asarray(ph.affine, dtype=np.float64), f"built-in phantom (seed {seed})"
    from .export.nifti import read_volume_array

    path = Path(ct).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"CT not found: {path}")
    hu, affine = read_volume_array(path, what="CT")
    return hu.astype(np.float32), affine, str(path)


def run_demo(ct: str | Path | None, out_dir: str | Path, *, weights: str | Path | None = None,
             mask_ratio: float = 0.75, seed: int = 0, spacing_mm: float = 1.5, device: str = "cpu",
             glyph_sigma: float = 2.0, glyph_threshold: float | None = None,
             phantom_shape: tuple[int, int, int] | str = (128, 128, 96)) -> DemoResult:
    from . import inference, spatial
    from .data.transforms import HU_WINDOW
    from .export import figures, glyphs, nifti, ply, slicer_scene
    from .train.checkpoint import load_model

    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"--mask-ratio must be in [0, 1), got {mask_ratio}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    clock = time.perf_counter

    t = clock()
    weights_path = resolve_weights(weights)
    hu, affine, source = load_ct(ct, seed, parse_shape(phantom_shape))
    timings["load_ct"] = clock() - t
    t = clock()
    model, config = load_model(weights_path, device=device)
    if not config.is_gaussian:
        raise ValueError(f"{weights_path}: the demo needs a Gaussian model, this checkpoint is {config.objective!r}")
    timings["load_model"] = clock() - t

    t = clock()
    prepared = inference.prepare_ct(hu, affine, spacing_mm=spacing_mm)
    timings["prepare"] = clock() - t
    t = clock()
    generator = torch.Generator(device=torch.device(device)).manual_seed(seed)
    result = inference.predict_volume(model, prepared, overlap=0, pad_last=True, mask_ratio=mask_ratio,
                                      stitch=True, generator=generator)
    timings["predict"] = clock() - t

    t = clock()
    lo, hi = HU_WINDOW
    pred_hu = lo + result.pred * (hi - lo)
    paths = {key: out / name for key, name in OUTPUT_NAMES.items()}
    nifti.write_volume(paths["prediction"], pred_hu, prepared.ijk_to_ras)
    nifti.write_volume(paths["mask"], result.mask, prepared.ijk_to_ras, kind="mask")
    ply.write_gaussians_ply(paths["ply"], result.gaussians, shape=prepared.shape, ijk_to_ras=prepared.ijk_to_ras)
    timings["write_nifti_ply"] = clock() - t

    t = clock()
    centres_ras, axes_ras = spatial.gaussians_to_world(result.gaussians, prepared.shape, prepared.ijk_to_ras)
    poly = glyphs.gaussian_glyph_polydata(centres_ras, axes_ras, result.gaussians.intensities[0].numpy(),
                                          sigma=glyph_sigma, threshold=glyph_threshold)
    timings["glyphs"] = clock() - t
    t = clock()
    slicer_scene.write_scene(paths["scene"], ct=(hu, affine), mask=(result.mask, prepared.ijk_to_ras),
                             prediction=(pred_hu, prepared.ijk_to_ras), glyphs=poly)
    timings["write_scene"] = clock() - t
    t = clock()
    figures.overview_png(paths["png"], ct=prepared.volume, prediction=result.pred.clamp(0, 1), mask=result.mask,
                         gaussians=result.gaussians, glyph_polydata=poly, spacing=spatial.spacing_of(prepared.ijk_to_ras),
                         sigma=glyph_sigma, title=f"MedGMAE demo: {Path(source).name if ct else source}, "
                                                 f"mask ratio {mask_ratio:g}, {result.gaussians.num_gaussians} Gaussians "
                                                 f"({weights_path.name})")
    timings["write_png"] = clock() - t
    timings = {k: round(v, 3) for k, v in timings.items()}
    return DemoResult(outputs={k: str(p) for k, p in paths.items()}, timings=timings, source=source,
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
    res = run_demo(args.ct, args.out, weights=args.weights, mask_ratio=args.mask_ratio, seed=args.seed,
                   spacing_mm=args.spacing, device=args.device, glyph_sigma=args.glyph_sigma,
                   glyph_threshold=args.glyph_threshold, phantom_shape=args.phantom_shape)
    print(json.dumps(asdict(res)) if args.json else format_summary(res))
    return 0
