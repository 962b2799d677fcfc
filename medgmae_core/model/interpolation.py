"""Interpolation of the visible voxels (normalised convolution): the non-learned baseline of the masked-region
scores and the source of the interpolation intensity prior (``ModelConfig.intensity_prior_sigma``)."""
from __future__ import annotations

import torch


def interpolate_visible(x: torch.Tensor, visible: torch.Tensor, sigma_vox: float) -> torch.Tensor:
    """The interpolation baseline: ``blur(x * visible) / blur(visible)`` (normalised convolution; the blur is
    ``scipy.ndimage.gaussian_filter(mode="constant")``) for ``x, visible [B, 1, D, H, W]``; voxels no visible
    voxel reaches get the mean of the visible voxels."""
    every_voxel = [torch.arange(n, dtype=torch.float64) for n in x.shape[2:]]
    return interpolate_visible_on_grid(x, visible, sigma_vox, every_voxel)[:, None]


def interpolate_visible_on_grid(x: torch.Tensor, visible: torch.Tensor, sigma_vox: float,
                                axes_vox: list[torch.Tensor], truncate: float = 4.0) -> torch.Tensor:
    """The normalised convolution of the visible voxels evaluated only on the grid ``axes_vox`` (three 1D
    tensors of voxel coordinates along D, H, W) -> ``[B, g_D, g_H, g_W]``: separable sums over the voxels within
    ``truncate * sigma`` of each grid point, without blurring the whole volume."""
    weight = visible.to(x.dtype)[:, 0]  # [B, D, H, W]
    radius = int(truncate * sigma_vox + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    norm = torch.exp(-0.5 * (taps / sigma_vox) ** 2).sum()  # the sampled kernel's sum, as scipy normalises
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
