"""``medgmae fit [CT] --num-gaussians K --out DIR``: fit Gaussians straight to a CT with the renderer.

The CT is prepared like the model's inputs (RAS, ``--spacing-mm`` mm, HU window [-175, 250] -> [0, 1]); the whole
prepared volume is fitted, or with ``--window`` one model-size window around ``--centre-ras`` (default: the
volume's centre). Without a CT the built-in phantom is used. Outputs in ``--out``:

* ``gaussians.ply``: the fitted Gaussians, 3DGS-style, in RAS mm (``intensity`` field: windowed units);
* ``fit.nii.gz``: their render in HU on the fitted (prepared) grid, which ``medgmae render --like`` reproduces;
* ``overview.png``: slices of the CT and of the fit with Gaussian outlines;
* ``metrics.json``: PSNR / SSIM against the prepared volume (data range 1), Gaussian count, median sigma.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from .. import spatial
from ..data.phantom import make_phantom
from ..data.transforms import HU_WINDOW
from ..data.volumes import read_volume
from ..export.figures import overview_png
from ..export.nifti import write_volume
from ..export.ply import write_gaussians_ply
from ..inference import centred_offset, extract_window, prepare_ct
from ..progress import ProgressReporter
from ..render import render_volume
from ..train.evaluation import largest_sigma_voxels
from ..volume_fit import fit_volume
from .options import add_option

OUTPUT_NAMES = {"ply": "gaussians.ply", "volume": "fit.nii.gz", "png": "overview.png", "metrics": "metrics.json"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ct", nargs="?", default=None,
                        help="CT: NIfTI / NRRD / MHA file or DICOM folder (default: the built-in phantom)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-gaussians", type=int, default=512, help="Gaussians k on the start grid (default 512)")
    parser.add_argument("--iters", type=int, default=600, help="Adam iterations (default 600)")
    parser.add_argument("--densify", action="store_true", help="clone / split by position gradient (default: fixed k)")
    parser.add_argument("--max-gaussians", type=int, default=None, help="cap with --densify (default 4 k)")
    parser.add_argument("--window", action="store_true", help="fit one model window (96^3) instead of the whole CT")
    parser.add_argument("--window-size", type=int, default=96, help="window edge in voxels with --window (default 96)")
    parser.add_argument("--centre-ras", default=None, help="window centre x,y,z in RAS mm (default: volume centre)")
    add_option(parser, "--spacing-mm", "--spacing", type=float, default=1.5,
               help="voxel spacing of the fit in mm (default 1.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the built-in phantom (default 0)")
    parser.add_argument("--progress-json", action="store_true", help="JSON-lines progress on stdout")


def _centre(text: str | None) -> np.ndarray | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3:
        raise ValueError(f"--centre-ras must be three numbers x,y,z in mm, got {text!r}")
    return np.asarray(values)


def main(args: argparse.Namespace) -> int:
    if args.num_gaussians < 1:
        raise ValueError(f"--num-gaussians must be >= 1, got {args.num_gaussians}")
    if args.iters < 1:
        raise ValueError(f"--iters must be >= 1, got {args.iters}")
    centre_ras = _centre(args.centre_ras)
    if args.ct is None:
        phantom = make_phantom((128, 128, 96), spacing_mm=args.spacing_mm, seed=args.seed)
        hu, affine, source = phantom.hu, phantom.affine, f"phantom (seed {args.seed})"
    else:
        vol = read_volume(args.ct, what="CT")
        hu, affine, source = vol.array, vol.affine, str(args.ct)
    prepared = prepare_ct(hu, affine, spacing_mm=args.spacing_mm)
    volume, ijk_to_ras = prepared.volume, prepared.ijk_to_ras
    if args.window:
        size = (int(args.window_size),) * 3
        centre = None if centre_ras is None else spatial.ras_to_voxel(centre_ras, ijk_to_ras)
        centre = (np.asarray(prepared.shape) - 1) / 2.0 if centre is None else centre
        offset = centred_offset(centre, prepared.shape, size)
        volume = extract_window(volume, offset, size)
        ijk_to_ras = ijk_to_ras @ np.vstack([np.hstack([np.eye(3), np.asarray(offset, float)[:, None]]), [0, 0, 0, 1]])
    shape = tuple(int(n) for n in volume.shape)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    reporter = ProgressReporter("fit", args.iters, json_lines=bool(args.progress_json))
    reporter.start(source=source, shape=list(shape), num_gaussians=args.num_gaussians, out=str(out))
    t0 = time.perf_counter()
    fit = fit_volume(volume, args.num_gaussians, iters=args.iters, densify=args.densify,
                     max_gaussians=args.max_gaussians,
                     on_progress=lambda e: reporter.progress(e["iteration"], psnr=e.get("psnr"),
                                                             gaussians=e["num_gaussians"]))
    gaussians = fit.gaussians

    rendered = render_volume(gaussians, shape)[0]
    lo, hi = HU_WINDOW
    paths = {k: out / v for k, v in OUTPUT_NAMES.items()}
    write_gaussians_ply(paths["ply"], gaussians, shape=shape, ijk_to_ras=ijk_to_ras)
    write_volume(paths["volume"], rendered * (hi - lo) + lo, ijk_to_ras)
    spacing = tuple(float(s) for s in spatial.spacing_of(ijk_to_ras))
    overview_png(paths["png"], ct=volume, prediction=rendered.clamp(0, 1), gaussians=gaussians, spacing=spacing,
                 title=f"direct fit: {gaussians.num_gaussians} Gaussians, PSNR {fit.metrics['psnr']:.2f} dB")
    metrics = {**fit.metrics, "source": source, "shape": list(shape), "window": bool(args.window),
               "median_largest_sigma_vox": float(largest_sigma_voxels(gaussians, shape).median()),
               "seconds": time.perf_counter() - t0, "history": fit.result.history}
    paths["metrics"].write_text(json.dumps(metrics, indent=1))
    reporter.done(**{k: str(v) for k, v in paths.items()}, psnr=fit.metrics["psnr"], gaussians=gaussians.num_gaussians)
    return 0
