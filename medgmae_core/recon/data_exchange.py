"""APS Data Exchange scans (HDF5 tomography, e.g. the tomopy tooth) as :class:`ProjectionData`.

A Data Exchange file holds raw counts ``exchange/data`` ``[V, rows, cols]``, flat fields ``exchange/data_white``,
dark fields ``exchange/data_dark`` and the angles ``exchange/theta`` in degrees. They are normalised to line
integrals with ``-log((I - dark) / (white - dark))``, the transmission clamped to ``[1e-4, inf)`` and pixels with
``white <= dark`` set to transmission 1 (:func:`normalise_counts`); the scan is parallel beam, the rotation axis
given or estimated (:func:`estimate_rotation_centre`).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..xray.geometry import GeometryError, ParallelBeam
from .projection_data import H5_SUFFIXES, ProjectionData

MIN_TRANSMISSION = 1e-4    # clamp before -log: line integrals stay <= 9.2


def is_data_exchange(path: str | Path) -> bool:
    """True for an HDF5 file with ``exchange/data`` (APS data-exchange)."""
    path = Path(path)
    if not path.name.lower().endswith(H5_SUFFIXES) or not path.exists():
        return False
    import h5py  # lazy: heavy, needed only for HDF5 files

    try:
        with h5py.File(path, "r") as f:
            return "exchange" in f and "data" in f["exchange"]
    except OSError:
        return False


def normalise_counts(data: np.ndarray, white: np.ndarray, dark: np.ndarray) -> np.ndarray:
    """Raw counts ``[V, rows, cols]`` -> line integrals ``-log((I - dark) / (white - dark))``.

    ``white``/``dark`` may be stacks ``[n, rows, cols]`` (averaged) or single
    frames. The transmission is clamped to ``>= MIN_TRANSMISSION``; detector
    pixels whose flat field is not above the dark field get transmission 1.
    """
    data = np.asarray(data, dtype=np.float64)
    white = np.asarray(white, dtype=np.float64)
    dark = np.asarray(dark, dtype=np.float64)
    white = white.mean(0) if white.ndim == 3 else white
    dark = dark.mean(0) if dark.ndim == 3 else dark
    if white.shape != data.shape[1:] or dark.shape != data.shape[1:]:
        raise ValueError(f"flat {list(white.shape)} / dark {list(dark.shape)} fields do not match the projections' "
                         f"detector {list(data.shape[1:])}")
    gain = white - dark
    ok = gain > 0
    trans = np.where(ok, (data - dark) / np.where(ok, gain, 1.0), 1.0)
    return (-np.log(np.maximum(trans, MIN_TRANSMISSION))).astype(np.float32)


def estimate_rotation_centre(sinogram: np.ndarray, angles: np.ndarray) -> float:
    """Column onto which the rotation axis projects, from the projections' centres of mass.

    For parallel beam the centre of mass of each projection traces
    ``c + a cos(theta) + b sin(theta)``; a linear least-squares fit gives ``c``.
    ``sinogram`` is ``[V, cols]`` or ``[V, rows, cols]`` (rows are summed).
    Needs an object inside the field of view and a background near 0.
    """
    s = np.asarray(sinogram, dtype=np.float64)
    s = s.sum(1) if s.ndim == 3 else s
    mass = np.clip(s, 0, None)
    total = mass.sum(1)
    if np.any(total <= 0):
        raise ValueError("cannot estimate the rotation centre: some projections are empty")
    com = (mass * np.arange(s.shape[1])).sum(1) / total
    a = np.stack([np.ones_like(angles), np.cos(angles), np.sin(angles)], 1)
    return float(np.linalg.lstsq(a, com, rcond=None)[0][0])


def bin_columns(projections: np.ndarray, factor: int) -> np.ndarray:
    """Average groups of ``factor`` detector columns (trailing columns that do not fill a group are dropped)."""
    if factor == 1:
        return projections
    v, r, c = projections.shape
    n = c // factor
    return projections[..., :n * factor].reshape(v, r, n, factor).mean(-1)


def load_data_exchange(path: str | Path, *, centre: float | str | None = "auto", bin_cols: int = 1,
                       pixel_size_mm: float = 1.0, grid_size: int | None = None) -> ProjectionData:
    """An APS data-exchange scan (parallel beam) as ProjectionData.

    ``centre``: the rotation-axis column in the raw detector (e.g. 295.5 for the
    tomopy tooth), ``"auto"``/None to estimate it (:func:`estimate_rotation_centre`).
    ``bin_cols`` averages detector columns (rows are kept). ``pixel_size_mm``
    is the detector pixel pitch (data-exchange files often omit it; units then
    are "pixels" and the attenuation is per pixel). The reconstruction grid is
    in-plane square, ``grid_size`` voxels a side (default: one voxel per binned
    column), inscribed in the disc the detector sees on both sides of the axis;
    along the rotation axis one voxel per detector row.
    """
    import h5py  # lazy: heavy, needed only for HDF5 files

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data-exchange file not found: {path}")
    if int(bin_cols) < 1:
        raise ValueError(f"bin_cols must be >= 1, got {bin_cols}")
    if not pixel_size_mm > 0:
        raise ValueError(f"pixel_size_mm must be positive, got {pixel_size_mm}")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("data", "data_white", "data_dark", "theta") if k not in f["exchange"]]
            if missing:
                raise ValueError(f"missing exchange/{', exchange/'.join(missing)}")
            data, white, dark = (f["exchange"][k][...] for k in ("data", "data_white", "data_dark"))
            theta = np.asarray(f["exchange"]["theta"][...], dtype=np.float64).reshape(-1)
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable data-exchange scan ({exc})") from None
    if data.ndim != 3 or theta.size != data.shape[0]:
        raise GeometryError(f"{path}: exchange/data has shape {list(data.shape)} but exchange/theta has {theta.size} "
                            "angles; they must match one to one")
    if theta.max() - theta.min() <= 2 * math.pi + 1e-6 and theta.size > 8:
        raise ValueError(f"{path}: exchange/theta spans {theta.max() - theta.min():.3f}: data-exchange angles are in "
                         "degrees, these look like radians")
    angles = np.deg2rad(theta)
    proj = normalise_counts(data, white, dark)  # [V, rows, cols]
    cols = proj.shape[2]
    if centre is None or centre == "auto":
        centre_col = estimate_rotation_centre(proj, angles)
        centre_how = "auto"
    else:
        centre_col = float(centre)
        centre_how = "given"
    if not (0 <= centre_col <= cols - 1):
        raise GeometryError(f"{path}: rotation centre column {centre_col:.1f} lies outside the detector (0..{cols - 1})")
    b = int(bin_cols)
    proj = bin_columns(proj, b)
    centre_b = (centre_col - (b - 1) / 2) / b  # binned column index of the axis
    cols_b = proj.shape[2]
    du = pixel_size_mm * b
    radius = min(centre_b, cols_b - 1 - centre_b) * du  # both detector sides see this far
    n = int(grid_size) if grid_size else int(math.floor(2 * radius / math.sqrt(2) / du)) + 1
    if n < 2:
        raise GeometryError(f"{path}: grid_size must be >= 2, got {n}")
    side = min((n - 1) * du, 2 * radius / math.sqrt(2))
    rows = proj.shape[1]
    geometry = ParallelBeam(angles=angles, detector_shape=(rows, cols_b), detector_spacing=(pixel_size_mm, du),
                            volume_extent_mm=(side, side, (rows - 1) * pixel_size_mm if rows > 1 else pixel_size_mm),
                            detector_offset=centre_b - (cols_b - 1) / 2)
    shape = (n, n, max(rows, 2))
    meta = {"rotation_centre_column": centre_col, "rotation_centre": centre_how, "bin_cols": b,
            "pixel_size_mm": pixel_size_mm,
            "units": f"unknown: attenuation per {pixel_size_mm:g} mm (1/mm only if --pixel-size {pixel_size_mm:g} is "
                     "the detector's true pixel pitch; data-exchange files do not record it)"}
    return ProjectionData(torch.from_numpy(proj), geometry, shape, source=str(path), meta=meta)


__all__ = ["is_data_exchange", "load_data_exchange", "normalise_counts", "estimate_rotation_centre", "bin_columns",
           "MIN_TRANSMISSION"]
