"""``medgmae render``: render a Gaussian PLY (from ``demo``, the Slicer module or ``reconstruct``) to NIfTI.

The grid comes from, in order: ``--like CT`` (render onto that CT's grid and affine), the
PLY's own ``medgmae shape``/``ijk_to_ras`` metadata, or ``--shape`` for a PLY in normalised
coordinates.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ply", type=Path, help="Gaussian PLY file (3DGS-style fields)")
    parser.add_argument("--out", type=Path, required=True, help="output NIfTI (.nii or .nii.gz)")
    parser.add_argument("--like", type=Path, default=None, help="CT whose grid and affine to render onto")
    parser.add_argument("--shape", default=None, help="grid D,H,W for a PLY in normalised coordinates")
    parser.add_argument("--convention", choices=("paper", "release"), default="paper")
    parser.add_argument("--cutoff", type=float, default=3.0, help="cut-off in sigmas (default 3)")
    parser.add_argument("--backend", default="auto", help="auto | numba | torch | reference")
    parser.add_argument("--png", type=Path, default=None, help="also write a PNG overview of the render")


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
    from .. import spatial
    from ..export.nifti import read_volume_array

    gs = ply.gaussians
    if like is not None:
        array, affine = read_volume_array(like, what="--like CT")
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


def main(args: argparse.Namespace) -> int:
    from ..export.nifti import write_volume
    from ..export.ply import read_gaussians_ply
    from . import render_volume, resolve_backend

    ply = read_gaussians_ply(args.ply)
    gaussians, shape, affine = resolve_grid(ply, args.like, args.shape)
    t0 = time.perf_counter()
    with torch.no_grad():
        volume = render_volume(gaussians, shape, cutoff=args.cutoff, convention=args.convention,
                               backend=args.backend)[0]  # [D, H, W]
    seconds = time.perf_counter() - t0
    write_volume(args.out, volume, affine)
    print(f"rendered {gaussians.num_gaussians} Gaussians into {tuple(shape)} with "
          f"{resolve_backend(gaussians, args.backend)} in {seconds:.2f} s -> {args.out}")
    if args.png is not None:
        from ..export.figures import overview_png
        from ..spatial import spacing_of

        shown = volume / volume.max().clamp_min(1e-12)
        overview_png(args.png, ct=shown.numpy(), gaussians=gaussians, spacing=tuple(spacing_of(affine)),
                     title=f"{args.ply.name}: {gaussians.num_gaussians} Gaussians")
        print(f"overview -> {args.png}")
    return 0
