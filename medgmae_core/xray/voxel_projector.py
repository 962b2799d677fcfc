"""Ray-driven projector for voxel volumes, and its exact adjoint.

Each detector pixel's ray is sampled at evenly spaced points (midpoint rule,
step <= ``step_fraction`` of the smallest voxel spacing) with trilinear
interpolation (``grid_sample``, ``align_corners=True`` so voxel ``i`` of ``N``
sits at ``i/(N-1)``, zero outside). The projection is sum(samples) * step in mm,
i.e. the line integral in mm of the volume's values.

``backproject`` is the exact transpose of that discrete linear map (the
vector-Jacobian product of the sampler), so <A x, y> = <x, A^T y> to rounding.
Rays are processed in blocks so memory stays bounded; plain torch, so it runs
unchanged on CUDA tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from .geometry import ConeBeam, GeometryError, check_geometry

DEFAULT_MAX_SAMPLES = 1 << 22  # samples per block (~50 MB of grid at float32)


@dataclass(frozen=True)
class RaySampling:
    """Where along each ray the samples sit: ``t = t0 + (k + 0.5) * step`` for ``k < n``."""

    t0: float
    step: float
    n: int


def ray_sampling(geometry, shape: tuple[int, int, int], step_fraction: float = 0.5) -> RaySampling:
    """Sampling covering the volume box (plus one voxel for the interpolation support)."""
    if not (0 < step_fraction <= 1):
        raise ValueError(f"step_fraction must be in (0, 1], got {step_fraction}")
    spacing = [e / (n - 1) for e, n in zip(geometry.volume_extent_mm, shape)]
    step_max = step_fraction * min(spacing)
    pad = max(spacing)
    if isinstance(geometry, ConeBeam):
        radius = 0.5 * math.sqrt(sum(e * e for e in geometry.volume_extent_mm)) + pad
        lo, hi = max(geometry.source_to_origin - radius, 0.0), geometry.source_to_origin + radius
    else:
        radius = geometry.inplane_radius_mm() + pad
        lo, hi = -radius, radius
    n = max(1, math.ceil((hi - lo) / step_max))
    return RaySampling(t0=lo, step=(hi - lo) / n, n=n)


def ray_blocks(geometry, n_steps: int, max_samples: int) -> Iterator[tuple[slice, slice]]:
    """(view slice, row slice) blocks of at most ~``max_samples`` samples."""
    per_row = geometry.cols * n_steps
    rows_per_block = max(1, min(geometry.rows, max_samples // per_row))
    if rows_per_block < geometry.rows:
        for v in range(geometry.n_views):
            for r0 in range(0, geometry.rows, rows_per_block):
                yield slice(v, v + 1), slice(r0, min(geometry.rows, r0 + rows_per_block))
        return
    views_per_block = max(1, max_samples // (per_row * geometry.rows))
    for v0 in range(0, geometry.n_views, views_per_block):
        yield slice(v0, min(geometry.n_views, v0 + views_per_block)), slice(0, geometry.rows)


def rays(geometry, views: slice, rows: slice, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray origins and unit directions, each ``[C, R, cols, 3]`` (mm)."""
    r, e_u = geometry.view_frames(dtype, device, views)  # [C, 3]
    u = geometry.column_coords(dtype, device)  # [cols]
    v = geometry.row_coords(dtype, device)[rows]  # [R]
    e_v = torch.tensor([0.0, 0.0, 1.0], dtype=dtype, device=device)
    plane = u[None, None, :, None] * e_u[:, None, None, :] + v[None, :, None, None] * e_v  # [C, R, cols, 3]
    if isinstance(geometry, ConeBeam):
        source = -geometry.source_to_origin * r[:, None, None, :]  # [C, 1, 1, 3]
        pixel = (geometry.source_to_detector - geometry.source_to_origin) * r[:, None, None, :] + plane
        direction = pixel - source
        direction = direction / direction.norm(dim=-1, keepdim=True)
        return source.expand_as(direction), direction
    return plane, r[:, None, None, :].expand_as(plane)


def sample_rays(volume: torch.Tensor, geometry, sampling: RaySampling, views: slice, rows: slice) -> torch.Tensor:
    """Line integrals for one block: volume ``[B, D, H, W]`` -> ``[B, C, R, cols]``."""
    origin, direction = rays(geometry, views, rows, volume.dtype, volume.device)  # [C, R, cols, 3]
    to_grid = (2.0 / geometry.extent_tensor(volume.dtype, volume.device)).flip(-1)  # mm -> [-1, 1], (W, H, D) order
    origin, direction = origin.flip(-1) * to_grid, direction.flip(-1) * to_grid
    t = sampling.t0 + (torch.arange(sampling.n, dtype=volume.dtype, device=volume.device) + 0.5) * sampling.step
    grid = torch.addcmul(origin[..., None, :], t[:, None], direction[..., None, :])  # [C, R, cols, n, 3]
    grid = grid.reshape(1, -1, sampling.n, 1, 3)
    samples = F.grid_sample(volume[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    line = samples.sum(dim=(-2, -1)) * sampling.step  # [1, B, C*R*cols]
    return line.reshape(volume.shape[0], *origin.shape[:3])


def _check_volume(volume: torch.Tensor, name: str = "volume") -> None:
    if not isinstance(volume, torch.Tensor) or volume.dim() != 4:
        shape = list(volume.shape) if isinstance(volume, torch.Tensor) else type(volume).__name__
        raise ValueError(f"{name} must be a [B, D, H, W] tensor, got {shape}")
    if min(volume.shape[1:]) < 2:
        raise ValueError(f"{name} needs at least 2 voxels per axis, got {list(volume.shape)}")
    if not volume.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {volume.dtype}")


def _project(volume: torch.Tensor, geometry, step_fraction: float, max_samples: int) -> torch.Tensor:
    sampling = ray_sampling(geometry, tuple(volume.shape[1:]), step_fraction)
    out = volume.new_zeros(volume.shape[0], geometry.n_views, geometry.rows, geometry.cols)
    for views, rows in ray_blocks(geometry, sampling.n, max_samples):
        out[:, views, rows] = sample_rays(volume, geometry, sampling, views, rows)
    return out


def _backproject(projections: torch.Tensor, geometry, shape, step_fraction: float, max_samples: int) -> torch.Tensor:
    sampling = ray_sampling(geometry, shape, step_fraction)
    probe = projections.new_zeros(projections.shape[0], *shape).requires_grad_(True)  # linear map: value unused
    out = projections.new_zeros(projections.shape[0], *shape)
    with torch.enable_grad():
        for views, rows in ray_blocks(geometry, sampling.n, max_samples):
            line = sample_rays(probe, geometry, sampling, views, rows)
            (grad,) = torch.autograd.grad(line, probe, projections[:, views, rows])
            out += grad
    return out


class _ProjectVolume(torch.autograd.Function):
    @staticmethod
    def forward(ctx, volume, geometry, step_fraction, max_samples):
        ctx.args = (geometry, tuple(volume.shape[1:]), step_fraction, max_samples)
        with torch.no_grad():
            return _project(volume, geometry, step_fraction, max_samples)

    @staticmethod
    def backward(ctx, grad):
        geometry, shape, step_fraction, max_samples = ctx.args
        return backproject(grad, geometry, shape, step_fraction=step_fraction, max_samples=max_samples), None, None, None


class _Backproject(torch.autograd.Function):
    @staticmethod
    def forward(ctx, projections, geometry, shape, step_fraction, max_samples):
        ctx.args = (geometry, step_fraction, max_samples)
        with torch.no_grad():
            return _backproject(projections, geometry, shape, step_fraction, max_samples)

    @staticmethod
    def backward(ctx, grad):
        geometry, step_fraction, max_samples = ctx.args
        return project_volume(grad, geometry, step_fraction=step_fraction, max_samples=max_samples), None, None, None, None


def project_volume(volume: torch.Tensor, geometry, *, step_fraction: float = 0.5,
                   max_samples: int = DEFAULT_MAX_SAMPLES) -> torch.Tensor:
    """Line integrals (mm x value) of ``volume [B, D, H, W]`` -> ``[B, V, rows, cols]``. Differentiable."""
    geometry = check_geometry(geometry)
    _check_volume(volume)
    return _ProjectVolume.apply(volume, geometry, step_fraction, max_samples)


def backproject(projections: torch.Tensor, geometry, shape, *, step_fraction: float = 0.5,
                max_samples: int = DEFAULT_MAX_SAMPLES) -> torch.Tensor:
    """Exact adjoint of ``project_volume``: ``[B, V, rows, cols]`` -> ``[B, D, H, W]``. Differentiable."""
    geometry = check_geometry(geometry)
    if projections.dim() != 4:
        raise GeometryError(f"projections must be [B, V, rows, cols], got shape {list(projections.shape)}")
    geometry.check_projections(projections)
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"shape must be three sizes (D, H, W), each >= 2, got {shape}")
    return _Backproject.apply(projections, geometry, shape, step_fraction, max_samples)


__all__ = ["project_volume", "backproject", "ray_sampling", "RaySampling"]
