"""Simulated scans: a CT volume (HU) becomes attenuation ``mu = MU_WATER (1 + HU / 1000)`` (clipped at 0;
``MU_WATER`` = water at about 70 keV), then is forward-projected with the voxel projector, with optional Poisson
noise at ``I0`` photons per unattenuated detector pixel.

The CT is read with the one reader (``data.readers.read_ct``), brought to RAS index order when it is NIfTI,
then cropped and block-averaged (:func:`load_ct_volume`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data.volumes import closest_ras
from ..spatial import spacing_of
from ..xray.geometry import ConeBeam, ParallelBeam
from ..xray.voxel_projector import project_volume
from .projection_data import ProjectionData

MU_WATER = 0.0192          # 1/mm, water at ~70 keV


def hu_to_mu(hu, mu_water: float = MU_WATER):
    """HU -> linear attenuation (1/mm), clipped at 0 (numpy or torch)."""
    if isinstance(hu, torch.Tensor):
        return (mu_water * (1 + hu / 1000.0)).clamp_min(0.0)
    return np.clip(mu_water * (1 + np.asarray(hu, dtype=np.float64) / 1000.0), 0.0, None)


def mu_to_hu(mu, mu_water: float = MU_WATER):
    return 1000.0 * (mu / mu_water - 1.0)


def parse_crop(text: str | None, shape: Sequence[int]) -> tuple[slice, slice, slice]:
    """``"i0:i1,j0:j1,k0:k1"`` (empty parts = whole axis) -> three slices, checked against ``shape``."""
    if not text:
        return (slice(None),) * 3
    parts = text.split(",")
    if len(parts) != 3:
        raise ValueError(f"--crop must be three ranges 'i0:i1,j0:j1,k0:k1', got {text!r}")
    out = []
    for axis, (part, n) in enumerate(zip(parts, shape)):
        lo, _, hi = part.partition(":")
        try:
            a = int(lo) if lo.strip() else 0
            b = int(hi) if hi.strip() else n
        except ValueError:
            raise ValueError(f"--crop range {part!r} (axis {axis}) must be integers 'start:stop'") from None
        if not (0 <= a < b <= n) or b - a < 2:
            raise ValueError(f"--crop range {part!r} (axis {axis}) must satisfy 0 <= start < stop <= {n} with >= 2 voxels")
        out.append(slice(a, b))
    return tuple(out)


def downsample_volume(volume: np.ndarray, affine: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Block-average by an integer ``factor`` per axis (trailing voxels dropped); the affine follows."""
    if factor == 1:
        return volume, affine
    if factor < 1:
        raise ValueError(f"downsample factor must be >= 1, got {factor}")
    shape = [n // factor for n in volume.shape]
    if min(shape) < 2:
        raise ValueError(f"downsample factor {factor} leaves fewer than 2 voxels on an axis of {list(volume.shape)}")
    v = volume[:shape[0] * factor, :shape[1] * factor, :shape[2] * factor]
    v = v.reshape(shape[0], factor, shape[1], factor, shape[2], factor).mean((1, 3, 5))
    a = np.asarray(affine, dtype=np.float64).copy()
    a[:3, 3] = a[:3, 3] + a[:3, :3] @ np.full(3, (factor - 1) / 2)  # new voxel 0 = centre of the first block
    a[:3, :3] = a[:3, :3] * factor
    return v, a


def load_ct_volume(path: str | Path, *, crop: str | None = None, downsample: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A CT (HU) as a float32 array in RAS index order and its ijk-to-RAS affine, cropped then downsampled."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"CT volume not found: {path}")
    # lazy: data.readers loads MONAI and SimpleITK (heavy), needed only when a CT is read
    from ..data.readers import read_ct

    # the one reader every command uses: errors name the file, [X, Y, Z, 1] is 3D, DICOM series are checked
    hu, affine = read_ct(path, what="CT volume", check_ct=False)
    hu, affine = closest_ras(hu.astype(np.float32, copy=False), affine)  # RAS index order, any format
    sl = parse_crop(crop, hu.shape)
    hu = hu[sl]
    affine = np.asarray(affine, dtype=np.float64).copy()
    affine[:3, 3] = affine[:3, 3] + affine[:3, :3] @ np.array([s.start or 0 for s in sl], dtype=np.float64)
    return downsample_volume(hu, affine, int(downsample))


def add_poisson_noise(projections: torch.Tensor, i0: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Line integrals -> noisy line integrals: counts ~ Poisson(I0 exp(-p)), zero counts read as 0.5."""
    if not i0 > 0:
        raise ValueError(f"noise photon count I0 must be positive, got {i0}")
    expected = float(i0) * torch.exp(-projections.double())
    counts = torch.poisson(expected, generator=generator).clamp_min(0.5)
    return (-torch.log(counts / float(i0))).to(projections.dtype)


def simulate_scan(mu: torch.Tensor | np.ndarray, spacing_mm: Sequence[float], *, geometry: str = "parallel",
                  views: int = 120, noise_i0: float | None = None, seed: int = 0, affine: np.ndarray | None = None,
                  source: str = "", mu_water: float | None = MU_WATER, **geometry_options) -> ProjectionData:
    """Forward-project an attenuation volume ``[D, H, W]`` (1/mm) with the voxel projector.

    ``geometry``: ``"parallel"`` (views over 180 degrees) or ``"cone"`` (over
    360 degrees); ``geometry_options`` go to ``ParallelBeam.for_volume`` /
    ``ConeBeam.for_volume`` (e.g. ``source_to_origin``, ``source_to_detector``).
    """
    vol = torch.as_tensor(np.asarray(mu, dtype=np.float32) if not isinstance(mu, torch.Tensor) else mu).float()
    if vol.dim() != 3:
        raise ValueError(f"volume must be [D, H, W], got shape {list(vol.shape)}")
    if int(views) < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    shape = tuple(vol.shape)
    if geometry == "parallel":
        geom = ParallelBeam.for_volume(shape, spacing_mm, int(views), **geometry_options)
    elif geometry == "cone":
        geom = ConeBeam.for_volume(shape, spacing_mm, int(views), **geometry_options)
    else:
        raise ValueError(f"geometry must be 'parallel' or 'cone', got {geometry!r}")
    geom.validate(shape)
    proj = project_volume(vol[None], geom)[0]  # [V, rows, cols]
    meta = {"simulated": True, "noise_i0": noise_i0, "views": int(views)}
    if noise_i0:
        proj = add_poisson_noise(proj, noise_i0, torch.Generator().manual_seed(int(seed)))
    return ProjectionData(proj, geom, shape, reference=vol, affine=affine, mu_water=mu_water, source=source, meta=meta)


def simulate_from_ct(path: str | Path, *, crop: str | None = None, downsample: int = 1, **options) -> ProjectionData:
    """Read a CT (HU), convert to attenuation and :func:`simulate_scan` it."""
    hu, affine = load_ct_volume(path, crop=crop, downsample=downsample)
    mu = hu_to_mu(hu).astype(np.float32)
    return simulate_scan(mu, tuple(spacing_of(affine)), affine=affine, source=str(path), **options)


__all__ = ["MU_WATER", "hu_to_mu", "mu_to_hu", "parse_crop", "downsample_volume", "load_ct_volume",
           "add_poisson_noise", "simulate_scan", "simulate_from_ct"]
