"""Interpolation of the visible voxels (normalised convolution): the non-learned baseline of the masked-region
scores and the source of the interpolation intensity prior (``ModelConfig.intensity_prior_sigma``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_blur(x: torch.Tensor, sigma_vox: float, truncate: float = 4.0) -> torch.Tensor:
    """``x [B, 1, D, H, W]`` blurred by a separable Gaussian of ``sigma_vox`` voxels, zeros outside the volume
    (``scipy.ndimage.gaussian_filter(mode="constant", truncate=truncate)`` per item)."""
    radius = int(truncate * sigma_vox + 0.5)
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma_vox) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    out = x
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        padding = [0, 0, 0]
        padding[axis] = radius
        out = F.conv3d(out, kernel.view(shape), padding=tuple(padding))
    return out


def interpolate_visible(x: torch.Tensor, visible: torch.Tensor, sigma_vox: float) -> torch.Tensor:
    """The interpolation baseline: ``blur(x * visible) / blur(visible)`` (normalised convolution) for
    ``x, visible [B, 1, D, H, W]``; voxels no visible voxel reaches get the mean of the visible voxels."""
    weight = visible.to(x.dtype)
    numerator = gaussian_blur(x * weight, sigma_vox)
    denominator = gaussian_blur(weight, sigma_vox)
    counts = weight.sum(dim=(1, 2, 3, 4), keepdim=True)
    visible_mean = (x * weight).sum(dim=(1, 2, 3, 4), keepdim=True) / counts.clamp_min(1)
    reached = denominator > 1e-6
    return torch.where(reached, numerator / denominator.clamp_min(1e-6), visible_mean.expand_as(x))


def sample_at(volume: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Trilinear values of ``volume [B, 1, D, H, W]`` at ``points [B or 1, n, 3]`` (normalised (d, h, w) in
    [0, 1], voxel ``i`` centred at ``(i + 0.5) / N``; outside the volume the border value) -> ``[B, n]``."""
    grid = (points.flip(-1) * 2 - 1).to(volume.dtype)  # grid_sample wants (x, y, z) = (w, h, d) in [-1, 1]
    grid = grid.expand(volume.shape[0], -1, -1)[:, :, None, None, :]  # [B, n, 1, 1, 3]
    values = F.grid_sample(volume, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return values[:, 0, :, 0, 0]  # [B, n]
