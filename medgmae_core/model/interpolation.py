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


def interpolate_visible_on_grid(x: torch.Tensor, visible: torch.Tensor, sigma_vox: float,
                                axes_vox: list[torch.Tensor], truncate: float = 4.0) -> torch.Tensor:
    """:func:`interpolate_visible` evaluated only on the grid ``axes_vox`` (three 1D tensors of voxel
    coordinates along D, H, W) -> ``[B, g_D, g_H, g_W]``: separable sums over the voxels within
    ``truncate * sigma`` of each grid point, without blurring the whole volume."""
    weight = visible.to(x.dtype)[:, 0]  # [B, D, H, W]
    radius = int(truncate * sigma_vox + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    norm = torch.exp(-0.5 * (taps / sigma_vox) ** 2).sum()  # gaussian_blur's kernel sum: the same thresholds
    kernels = []
    for centres, n in zip(axes_vox, x.shape[2:]):
        distance = centres.to(x.device, torch.float64)[:, None] - torch.arange(n, device=x.device, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (distance / sigma_vox) ** 2) * (distance.abs() <= radius) / norm.to(x.device)
        kernels.append(kernel.to(x.dtype))  # [g, N]

    def smooth(volume: torch.Tensor) -> torch.Tensor:  # [B, D, H, W] -> [B, g_D, g_H, g_W]
        volume = torch.einsum("bdhw,kw->bdhk", volume, kernels[2])
        volume = torch.einsum("bdhk,jh->bdjk", volume, kernels[1])
        return torch.einsum("bdjk,id->bijk", volume, kernels[0])

    numerator, denominator = smooth(x[:, 0] * weight), smooth(weight)
    counts = weight.sum(dim=(1, 2, 3)).clamp_min(1)
    visible_mean = (x[:, 0] * weight).sum(dim=(1, 2, 3)) / counts  # [B]
    fallback = visible_mean[:, None, None, None].expand_as(numerator)
    return torch.where(denominator > 1e-6, numerator / denominator.clamp_min(1e-6), fallback)
