"""Analytic reconstruction: FBP (parallel beam) and FDK (cone beam), in torch.

Both filter each detector row with a ramp (the band-limited Ram-Lak kernel of
Kak & Slaney, optionally windowed), then back-project pixel-driven with
bilinear detector interpolation, so ``fbp(project_volume(x)) ~= x``:

* parallel: ``f(x) = pi / V * sum_views q(theta, u(x), v(x))`` for views evenly
  spread over pi (or 2 pi).
* FDK (flat detector, circular orbit, full 2 pi scan): rows are pre-weighted by
  ``SDD / sqrt(SDD^2 + u^2 + v^2)``, filtered on the virtual detector at the
  rotation axis and back-projected with the distance weight ``SOD^2 / U^2``,
  ``U = SOD + x . r``.

The detector column offset (off-centre rotation axis) enters through
``geometry.axis_column``. Device-agnostic; views are processed in chunks.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from .geometry import ConeBeam, GeometryError, ParallelBeam, check_geometry

log = logging.getLogger(__name__)

FILTERS = ("ram-lak", "shepp-logan", "cosine", "hann")
DEFAULT_MAX_SAMPLES = 1 << 23


def ramp_filter(n_cols: int, spacing: float, filter: str = "ram-lak", dtype=torch.float32, device=None) -> torch.Tensor:
    """Real frequency response ``[n_fft // 2 + 1]`` of the (windowed) ramp for rows of ``n_cols`` samples."""
    if filter not in FILTERS:
        raise ValueError(f"filter must be one of {FILTERS}, got {filter!r}")
    n_fft = 1 << max(6, math.ceil(math.log2(2 * n_cols)))
    n = torch.fft.fftfreq(n_fft, d=1.0 / n_fft).to(torch.float64)  # 0, 1, ..., -1 sample offsets
    kernel = torch.zeros(n_fft, dtype=torch.float64)
    kernel[0] = 1.0 / (4 * spacing**2)
    odd = n.remainder(2) == 1
    kernel[odd] = -1.0 / (math.pi * n[odd] * spacing) ** 2
    response = torch.fft.rfft(kernel).real * spacing  # spacing: the convolution is an integral
    freq = torch.fft.rfftfreq(n_fft, dtype=torch.float64)  # cycles / sample in [0, 0.5]
    if filter == "shepp-logan":
        response = response * torch.sinc(freq)
    elif filter == "cosine":
        response = response * torch.cos(math.pi * freq)
    elif filter == "hann":
        response = response * 0.5 * (1 + torch.cos(2 * math.pi * freq))
    return response.to(dtype=dtype, device=device)


def filter_rows(projections: torch.Tensor, spacing: float, filter: str = "ram-lak") -> torch.Tensor:
    """Ramp-filter along the last (column) axis: ``[..., cols]`` -> ``[..., cols]``."""
    cols = projections.shape[-1]
    response = ramp_filter(cols, spacing, filter, projections.dtype, projections.device)
    n_fft = 2 * (response.numel() - 1)
    spectrum = torch.fft.rfft(projections, n=n_fft, dim=-1) * response
    return torch.fft.irfft(spectrum, n=n_fft, dim=-1)[..., :cols]


def voxel_coords_mm(geometry, shape, dtype, device) -> list[torch.Tensor]:
    """Per-axis voxel centre coordinates (mm), each ``[N_a]``."""
    return [(torch.linspace(0, 1, n, dtype=dtype, device=device) - 0.5) * e
            for n, e in zip(shape, geometry.volume_extent_mm)]


def _to_grid(index: torch.Tensor, size: int) -> torch.Tensor:
    """Pixel index -> ``grid_sample`` coordinate (align_corners=True)."""
    return index * (2.0 / (size - 1)) - 1.0 if size > 1 else torch.zeros_like(index)


def backproject_filtered(filtered: torch.Tensor, geometry, shape, max_samples: int = DEFAULT_MAX_SAMPLES) -> torch.Tensor:
    """Pixel-driven weighted back-projection ``[B, V, rows, cols]`` -> ``[B, D, H, W]`` (sum over views)."""
    batch = filtered.shape[0]
    x0, x1, x2 = voxel_coords_mm(geometry, shape, filtered.dtype, filtered.device)
    dv, du = geometry.detector_spacing
    out = filtered.new_zeros(batch, shape[0] * shape[1], shape[2])
    per_view = shape[0] * shape[1] * shape[2]
    chunk = max(1, max_samples // per_view)
    for v0 in range(0, geometry.n_views, chunk):
        views = slice(v0, v0 + chunk)
        a = geometry.angles[views].to(device=filtered.device, dtype=torch.float64)
        cs, sn = (t.to(filtered.dtype)[:, None, None] for t in (torch.cos(a), torch.sin(a)))  # [C, 1, 1]
        u = -sn * x0[:, None] + cs * x1[None, :]  # [C, D, H] along e_u
        weight, scale = 1.0, 1.0
        if isinstance(geometry, ConeBeam):
            depth = geometry.source_to_origin + cs * x0[:, None] + sn * x1[None, :]  # [C, D, H]
            scale = geometry.source_to_detector / depth
            weight = (geometry.source_to_origin / depth) ** 2
        col = (u * scale).reshape(u.shape[0], -1, 1) / du + geometry.axis_column  # [C, D*H, 1]
        scale_flat = scale.reshape(u.shape[0], -1, 1) if torch.is_tensor(scale) else scale
        row = (x2[None, None, :] * scale_flat) / dv + geometry.centre_row  # [C, D*H|1, W]
        col, row = torch.broadcast_tensors(col, row)
        grid = torch.stack([_to_grid(col, geometry.cols), _to_grid(row, geometry.rows)], -1)  # [C, D*H, W, 2]
        images = filtered[:, views].transpose(0, 1)  # [C, B, rows, cols]
        samples = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)  # [C,B,DH,W]
        if torch.is_tensor(weight):
            samples = samples * weight.reshape(weight.shape[0], 1, -1, 1)
        out += samples.sum(0)
    return out.reshape(batch, *shape)


def _prepare(projections: torch.Tensor, geometry, shape, kind) -> tuple[torch.Tensor, tuple[int, int, int], bool]:
    geometry = check_geometry(geometry)
    if not isinstance(geometry, kind):
        raise GeometryError(f"geometry must be a {kind.__name__} here, got {type(geometry).__name__}")
    if not isinstance(projections, torch.Tensor) or not projections.is_floating_point():
        raise ValueError("projections must be a floating-point tensor [B, V, rows, cols] or [V, rows, cols]")
    geometry.check_projections(projections)
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"shape must be three sizes (D, H, W), each >= 2, got {shape}")
    unbatched = projections.dim() == 3
    return (projections[None] if unbatched else projections), shape, unbatched


def fbp(projections: torch.Tensor, geometry: ParallelBeam, shape, filter: str = "ram-lak") -> torch.Tensor:
    """Parallel-beam FBP: ``[B, V, rows, cols]`` (line integrals, mm) -> ``[B, D, H, W]``."""
    proj, shape, unbatched = _prepare(projections, geometry, shape, ParallelBeam)
    filtered = filter_rows(proj, geometry.detector_spacing[1], filter)
    volume = backproject_filtered(filtered, geometry, shape) * (math.pi / geometry.n_views)
    return volume[0] if unbatched else volume


def fdk(projections: torch.Tensor, geometry: ConeBeam, shape, filter: str = "ram-lak") -> torch.Tensor:
    """Cone-beam FDK (full 2 pi orbit): ``[B, V, rows, cols]`` -> ``[B, D, H, W]``."""
    proj, shape, unbatched = _prepare(projections, geometry, shape, ConeBeam)
    span = float(geometry.angles.max() - geometry.angles.min()) * geometry.n_views / max(1, geometry.n_views - 1)
    if span < 2 * math.pi * 0.98:
        log.warning("fdk: views span %.0f deg; FDK here assumes a full 360 deg orbit (no Parker weights)",
                    math.degrees(span))
    u = geometry.column_coords(proj.dtype, proj.device)  # [cols]
    v = geometry.row_coords(proj.dtype, proj.device)  # [rows]
    sdd = geometry.source_to_detector
    cosine = sdd / torch.sqrt(sdd**2 + u[None, :] ** 2 + v[:, None] ** 2)  # [rows, cols]
    virtual_spacing = geometry.detector_spacing[1] / geometry.magnification
    filtered = filter_rows(proj * cosine, virtual_spacing, filter)
    volume = backproject_filtered(filtered, geometry, shape) * (math.pi / geometry.n_views)
    return volume[0] if unbatched else volume


def reconstruct_analytic(projections: torch.Tensor, geometry, shape, filter: str = "ram-lak") -> torch.Tensor:
    """FBP for ``ParallelBeam``, FDK for ``ConeBeam``."""
    geometry = check_geometry(geometry)
    method = fdk if isinstance(geometry, ConeBeam) else fbp
    return method(projections, geometry, shape, filter)


__all__ = ["fbp", "fdk", "reconstruct_analytic", "ramp_filter", "filter_rows", "FILTERS"]
