"""``medgmae render``: render a Gaussian PLY (from ``demo``, the Slicer module or ``reconstruct``) to NIfTI.

The grid comes from exactly one of: ``--like CT`` (render onto that CT's grid and affine), the
PLY's own ``medgmae shape``/``ijk_to_ras`` metadata, or ``--shape`` for a PLY in normalised
coordinates without a stored grid. Conflicting choices (``--shape`` with ``--like``, or ``--shape``
for a PLY that stores its own grid) are refused rather than one silently ignored. The PLY's fields
are validated on reading (``export.ply.check_ply_fields``); the NIfTI and PNG are written together
or not at all.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from .. import spatial
from ..errors import StagedOutputs, make_output_dir
from ..export.figures import overview_png
from ..export.nifti import read_volume_array, write_volume
from ..export.ply import read_gaussians_ply
from ..progress import ProgressReporter
from ..render import render_volume, resolve_backend


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ply", type=Path, help="Gaussian PLY file (3DGS-style fields)")
    parser.add_argument("--out", type=Path, required=True, help="output NIfTI (.nii or .nii.gz)")
    parser.add_argument("--like", type=Path, default=None, help="CT whose grid and affine to render onto")
    parser.add_argument("--shape", default=None, help="grid D,H,W for a PLY in normalised coordinates")
    parser.add_argument("--convention", choices=("paper", "release"), default="paper")
    parser.add_argument("--cutoff", type=float, default=3.0, help="cut-off in sigmas (default 3)")
    parser.add_argument("--backend", default="auto", help="auto | numba | torch | reference")
    parser.add_argument("--png", type=Path, default=None, help="also write a PNG overview of the render")
    parser.add_argument("--max-voxels", type=int, default=None,
                        help="refuse an output grid above this many voxels (default 100 M, or less if the memory "
                             "would not hold it)")


def _shape(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--shape must be D,H,W (three integers), got {text!r}") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or min(values) < 2:
        raise ValueError(f"--shape must be D,H,W with each >= 2, got {text!r}")
    return values  # type: ignore[return-value]


def resolve_grid(ply, like: Path | None, shape_text: str | None):
    """``(gaussians, shape, ijk_to_ras)`` on the grid to render: ``--like``, the PLY's own, or ``--shape``."""
    gs = ply.gaussians
    if shape_text is not None and like is not None:
        raise ValueError("--shape and --like both choose the output grid; give one of them")
    if shape_text is not None and ply.shape is not None:
        raise ValueError(f"--shape {shape_text} conflicts with the grid stored in the PLY (shape "
                         f"{'x'.join(str(n) for n in ply.shape)}); drop --shape to render on the PLY's own grid, "
                         "or use --like CT to render onto another CT's grid")
    if like is not None:
        array, affine = read_volume_array(like, what="--like CT")
        if min(array.shape) < 2:
            raise ValueError(f"--like CT {like}: grid {tuple(array.shape)} has an axis of one voxel; rendering needs "
                             "at least 2 voxels per axis")
        if ply.coords != "ras" or ply.ijk_to_ras is None:
            raise ValueError("--like needs a PLY in RAS millimetres (written with an affine)")
        centres, axes = spatial.gaussians_to_world(gs, ply.shape, ply.ijk_to_ras)
        gs = spatial.world_to_gaussians(centres, axes, gs.intensities[0].numpy(), array.shape, affine)
        return gs, tuple(array.shape), affine
    if ply.shape is not None:
        return gs, ply.shape, ply.ijk_to_ras if ply.ijk_to_ras is not None else np.eye(4)
    if shape_text is None:
        raise ValueError("this PLY has no grid metadata: pass --shape D,H,W or --like CT")
    return gs, _shape(shape_text), np.eye(4)


def check_arguments(args: argparse.Namespace) -> None:
    """Everything about the outputs and settings that can be checked before reading or rendering."""
    if not str(args.out).endswith((".nii", ".nii.gz")):
        raise ValueError(f"--out must be a NIfTI path (.nii or .nii.gz), got {args.out}")
    if Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a folder; give the NIfTI file name")
    if args.png is not None and Path(args.png).suffix.lower() != ".png":
        raise ValueError(f"--png must end in .png, got {args.png}")
    if not (np.isfinite(args.cutoff) and args.cutoff > 0):
        raise ValueError(f"--cutoff must be a positive number of sigmas, got {args.cutoff}")
    if args.max_voxels is not None and args.max_voxels < 1:
        raise ValueError(f"--max-voxels must be >= 1, got {args.max_voxels}")
    if args.backend not in ("auto", "numba", "torch", "reference"):
        raise ValueError(f"--backend must be auto, numba, torch or reference, got {args.backend!r}")


def main(args: argparse.Namespace) -> int:
    check_arguments(args)
    reporter = ProgressReporter("render", 1, json_lines=True) if getattr(args, "progress_json", False) else None
    ply = read_gaussians_ply(args.ply)
    gaussians, shape, affine = resolve_grid(ply, args.like, args.shape)
    from ..data.transforms import check_resample_size  # lazy: MONAI is heavy, loaded only when rendering

    check_resample_size(shape, spatial.spacing_of(affine), None, max_voxels=args.max_voxels, bytes_per_voxel=12.0,
                        what=f"render grid of {args.ply}",
                        spacing_option="grid (a smaller --shape or --like CT)")
    if reporter is not None:
        reporter.start(ply=str(args.ply), gaussians=gaussians.num_gaussians, shape=list(shape))
    t0 = time.perf_counter()
    with torch.no_grad():
        volume = render_volume(gaussians, shape, cutoff=args.cutoff, convention=args.convention,
                               backend=args.backend)[0]  # [D, H, W]
    seconds = time.perf_counter() - t0
    make_output_dir(Path(args.out).parent)
    if args.png is not None:
        make_output_dir(Path(args.png).parent)
    staged = StagedOutputs()  # the NIfTI and the PNG together, or neither
    try:
        write_volume(staged.path(args.out), volume, affine)
        if args.png is not None:
            shown = volume / volume.max().clamp_min(1e-12)
            overview_png(staged.path(args.png), ct=shown.numpy(), gaussians=gaussians,
                         spacing=tuple(spatial.spacing_of(affine)), title=f"{args.ply.name}: {gaussians.num_gaussians} Gaussians")
        staged.commit()
    finally:
        staged.discard()
    backend = resolve_backend(gaussians, args.backend)
    if reporter is not None:
        reporter.progress(1)
        reporter.done(out=str(args.out), png=str(args.png) if args.png else None, backend=backend,
                      seconds=round(seconds, 3))
    else:
        print(f"rendered {gaussians.num_gaussians} Gaussians into {tuple(shape)} with {backend} in {seconds:.2f} s "
              f"-> {args.out}")
        if args.png is not None:
            print(f"overview -> {args.png}")
    return 0
