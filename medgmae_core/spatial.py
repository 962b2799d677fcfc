"""Coordinate maps: the ONE place that converts between the project's spaces.

Spaces (array axes ``i, j, k`` are axes 0, 1, 2 of a ``[D, H, W]`` volume):

* **normalised** ``[0, 1]^3`` of a grid of ``shape`` ``(N_0, N_1, N_2)``: voxel ``i`` sits at ``i / (N - 1)``;
  GaussianSet centres and scales live here (of a 96^3 model window or of a whole volume).
* **voxel** indices ``(i, j, k)`` (float): ``voxel = normalised * (N - 1)``.
* **world** RAS millimetres through a 4x4 ``ijk_to_ras`` affine ``[A | t]`` (NIfTI / Slicer IJKToRAS), which may
  be oblique or LPS-flipped.

A linear map ``x' = L x + t`` sends a Gaussian's axes ``R diag(s)`` to ``L R diag(s)``; the covariance of the
image is ``(L R diag s)(L R diag s)^T``. When ``L`` is not a similarity the columns are no longer orthogonal, so
``axes_to_scales_quaternions`` re-factors them (SVD) into a rotation and scales with the same covariance.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .gaussians import GaussianSet, quaternion_to_rotation, rotation_to_quaternion

Shape3 = tuple[int, int, int]


# ----------------------------------------------------------------------------- validation
def check_affine(ijk_to_ras, name: str = "ijk_to_ras") -> np.ndarray:
    """A 4x4 float64 affine with last row (0, 0, 0, 1) and an invertible 3x3 part, or a clear error."""
    a = np.asarray(ijk_to_ras, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"{name} must be a 4x4 matrix, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf")
    if not np.allclose(a[3], [0, 0, 0, 1]):
        raise ValueError(f"{name} must have last row (0, 0, 0, 1), got {a[3].tolist()}")
    if abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise ValueError(f"{name} has a singular 3x3 part (zero voxel spacing?)")
    return a


def check_shape(shape, name: str = "shape") -> Shape3:
    try:
        out = tuple(int(n) for n in shape)
    except TypeError:
        raise ValueError(f"{name} must be three integers, got {shape!r}") from None
    if len(out) != 3 or min(out) < 2:
        raise ValueError(f"{name} must be three integers >= 2, got {shape!r}")
    return out  # type: ignore[return-value]


def spacing_of(ijk_to_ras) -> np.ndarray:
    """Voxel spacing in mm along i, j, k: the column norms of the affine's 3x3 part."""
    return np.linalg.norm(check_affine(ijk_to_ras)[:3, :3], axis=0)


def _extent(shape: Sequence[int]) -> np.ndarray:
    return np.asarray(shape, dtype=np.float64) - 1.0  # N - 1 per axis


def _as(x, values: np.ndarray):
    """``values`` as the array type (numpy / torch dtype and device) of ``x``."""
    if isinstance(x, torch.Tensor):
        return torch.as_tensor(values, dtype=x.dtype if x.is_floating_point() else torch.float64, device=x.device)
    return values


def _float(x):
    if isinstance(x, torch.Tensor):
        return x if x.is_floating_point() else x.double()
    return np.asarray(x, dtype=np.float64)


# ----------------------------------------------------------------------------- points
def normalised_to_voxel(coords, shape):
    """``[..., 3]`` normalised -> voxel indices (numpy or torch, same type out)."""
    coords = _float(coords)
    return coords * _as(coords, _extent(check_shape(shape)))


def voxel_to_normalised(ijk, shape):
    ijk = _float(ijk)
    return ijk / _as(ijk, _extent(check_shape(shape)))


def voxel_to_ras(ijk, ijk_to_ras):
    """``[..., 3]`` voxel indices -> RAS mm."""
    a = check_affine(ijk_to_ras)
    ijk = _float(ijk)
    return ijk @ _as(ijk, a[:3, :3].T) + _as(ijk, a[:3, 3])


def ras_to_voxel(ras, ijk_to_ras):
    a = check_affine(ijk_to_ras)
    inv = np.linalg.inv(a)
    ras = _float(ras)
    return ras @ _as(ras, inv[:3, :3].T) + _as(ras, inv[:3, 3])


def normalised_to_ras(coords, shape, ijk_to_ras):
    return voxel_to_ras(normalised_to_voxel(coords, shape), ijk_to_ras)


def ras_to_normalised(ras, shape, ijk_to_ras):
    return voxel_to_normalised(ras_to_voxel(ras, ijk_to_ras), shape)


def normalised_to_ras_affine(shape, ijk_to_ras) -> np.ndarray:
    """The 4x4 affine from normalised coords of a grid of ``shape`` to RAS: ``ijk_to_ras @ diag(N - 1, 1)``."""
    return check_affine(ijk_to_ras) @ np.diag([*_extent(check_shape(shape)), 1.0])


# ----------------------------------------------------------------------------- Gaussians
def axes_to_scales_quaternions(axes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Axes matrices ``[..., 3, 3]`` (columns = scaled axes, not necessarily orthogonal) -> (scales, quaternions).

    ``axes axes^T = R diag(s)^2 R^T`` with ``R`` a proper rotation (det +1): the left singular vectors and the
    singular values of ``axes``.
    """
    u, sv, _ = torch.linalg.svd(axes)
    sign = torch.sign((torch.linalg.cross(u[..., :, 0], u[..., :, 1], dim=-1) * u[..., :, 2]).sum(-1))  # det(u)
    u = torch.cat([u[..., :2], u[..., 2:] * sign[..., None, None]], dim=-1)
    return sv.clamp_min(torch.finfo(axes.dtype).tiny), rotation_to_quaternion(u)


def gaussian_axes(gaussians: GaussianSet) -> torch.Tensor:
    """``[B, k, 3, 3]``: ``R diag(s)``, whose columns are the Gaussian's 1-sigma axes."""
    return gaussians.rotations() * gaussians.scales[..., None, :]


def map_gaussians(gaussians: GaussianSet, linear, translation) -> GaussianSet:
    """Image of Gaussians under ``x' = L x + t`` (``L`` 3x3, ``t`` 3); covariance ``L Sigma L^T``.

    A positive multiple of the identity keeps the quaternions as they are; any other ``L`` re-factors the
    axes (``axes_to_scales_quaternions``).
    """
    ref = gaussians.centres
    lin = torch.as_tensor(np.asarray(linear, dtype=np.float64), dtype=ref.dtype, device=ref.device)
    shift = torch.as_tensor(np.asarray(translation, dtype=np.float64), dtype=ref.dtype, device=ref.device)
    if lin.shape != (3, 3) or shift.shape != (3,):
        raise ValueError(f"map_gaussians needs a 3x3 linear part and a 3-vector translation, got "
                         f"{tuple(lin.shape)} and {tuple(shift.shape)}")
    centres = ref @ lin.T + shift
    diag = torch.diagonal(lin)
    if bool(torch.all(lin == torch.diag(diag))) and bool(torch.all(diag == diag[0])) and float(diag[0]) > 0:
        return GaussianSet(centres, gaussians.scales * diag[0], gaussians.quaternions, gaussians.intensities)
    scales, quats = axes_to_scales_quaternions(lin @ gaussian_axes(gaussians))
    return GaussianSet(centres, scales, quats, gaussians.intensities)


def window_to_volume(gaussians: GaussianSet, offset, window_shape, volume_shape) -> GaussianSet:
    """Gaussians in a window's normalised coords -> the whole volume's normalised coords.

    The window's voxel 0 is the volume's voxel ``offset`` (any integers, also negative or past the end):
    ``mu_global = (offset + mu (n - 1)) / (N - 1)`` per axis, and axes scale by ``(n - 1) / (N - 1)``.
    """
    n, big = _extent(check_shape(window_shape, "window_shape")), _extent(check_shape(volume_shape, "volume_shape"))
    off = np.asarray(offset, dtype=np.float64).reshape(3)
    return map_gaussians(gaussians, np.diag(n / big), off / big)


def volume_to_window(gaussians: GaussianSet, offset, window_shape, volume_shape) -> GaussianSet:
    """Inverse of :func:`window_to_volume`."""
    n, big = _extent(check_shape(window_shape, "window_shape")), _extent(check_shape(volume_shape, "volume_shape"))
    off = np.asarray(offset, dtype=np.float64).reshape(3)
    return map_gaussians(gaussians, np.diag(big / n), -off / n)


def gaussians_to_world(gaussians: GaussianSet, shape, ijk_to_ras) -> tuple[np.ndarray, np.ndarray]:
    """Gaussians in normalised coords of a grid of ``shape`` -> RAS.

    Returns ``centres_ras [n, 3]`` and ``axes_ras [n, 3, 3] = A diag(N - 1) R diag(s)`` (float64 numpy, batch
    items concatenated), so ``axes_ras @ axes_ras^T`` is the RAS covariance in mm^2.
    """
    to_ras = normalised_to_ras_affine(shape, ijk_to_ras)
    centres = gaussians.centres.detach().reshape(-1, 3).cpu().double().numpy()
    rot = quaternion_to_rotation(gaussians.quaternions.detach().cpu().double())  # no GaussianSet re-validation
    axes = (rot * gaussians.scales.detach().cpu().double()[..., None, :]).reshape(-1, 3, 3).numpy()
    return centres @ to_ras[:3, :3].T + to_ras[:3, 3], to_ras[:3, :3] @ axes


def world_to_gaussians(centres_ras, axes_ras, intensities, shape, ijk_to_ras,
                       dtype: torch.dtype = torch.float32) -> GaussianSet:
    """Inverse of :func:`gaussians_to_world` (batch size 1): RAS centres and axes -> normalised GaussianSet."""
    from_ras = np.linalg.inv(normalised_to_ras_affine(shape, ijk_to_ras))
    centres = np.asarray(centres_ras, dtype=np.float64).reshape(-1, 3)
    axes = np.asarray(axes_ras, dtype=np.float64).reshape(-1, 3, 3)
    inten = np.asarray(intensities, dtype=np.float64).reshape(-1)
    if not (len(centres) == len(axes) == len(inten)):
        raise ValueError(f"world_to_gaussians: {len(centres)} centres, {len(axes)} axes and {len(inten)} "
                         "intensities must have the same length")
    scales, quats = axes_to_scales_quaternions(torch.from_numpy(from_ras[:3, :3] @ axes))
    return GaussianSet(torch.from_numpy(centres @ from_ras[:3, :3].T + from_ras[:3, 3])[None],
                       scales[None], quats[None], torch.from_numpy(inten)[None]).to(dtype=dtype)


def world_axes_to_scales_quaternions(axes_ras) -> tuple[np.ndarray, np.ndarray]:
    """World axes ``[n, 3, 3]`` -> principal scales (mm) ``[n, 3]`` and quaternions ``[n, 4]`` (w, x, y, z)."""
    scales, quats = axes_to_scales_quaternions(torch.from_numpy(np.asarray(axes_ras, dtype=np.float64)))
    return scales.numpy(), quats.numpy()


def world_scales_quaternions_to_axes(scales, quaternions) -> np.ndarray:
    """Inverse of :func:`world_axes_to_scales_quaternions`: ``R(q) diag(s)`` ``[n, 3, 3]``."""
    rot = quaternion_to_rotation(torch.from_numpy(np.asarray(quaternions, dtype=np.float64)))
    return (rot * torch.from_numpy(np.asarray(scales, dtype=np.float64))[..., None, :]).numpy()


def resampled_affine(ijk_to_ras, old_shape, new_shape) -> np.ndarray:
    """Affine of a grid resampled with corner-aligned sampling (first and last voxel centres kept)."""
    a = check_affine(ijk_to_ras).copy()
    factor = _extent(check_shape(old_shape, "old_shape")) / _extent(check_shape(new_shape, "new_shape"))
    a[:3, :3] = a[:3, :3] * factor[None, :]
    return a


__all__ = [
    "check_affine", "check_shape", "spacing_of", "normalised_to_voxel", "voxel_to_normalised", "voxel_to_ras",
    "ras_to_voxel", "normalised_to_ras", "ras_to_normalised", "normalised_to_ras_affine",
    "axes_to_scales_quaternions", "gaussian_axes", "map_gaussians", "window_to_volume", "volume_to_window",
    "gaussians_to_world", "world_to_gaussians", "world_axes_to_scales_quaternions",
    "world_scales_quaternions_to_axes", "resampled_affine",
]
