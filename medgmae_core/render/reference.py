"""Dense reference renderer: slow and obviously right; the truth the fast paths are tested against.

Evaluates every (Gaussian, voxel) pair, then keeps those inside the cut-off:
the r-sigma ellipsoid for the paper convention, the release's unrotated box
otherwise. Runs in any dtype (use float64 for gradcheck) and on any device.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..gaussians import GaussianSet
from .conventions import (RELEASE_BOX_HALF_WIDTH, check_cutoff, check_gaussians, check_shape,
                          effective_precisions, get_convention)


def voxel_grid(shape: tuple[int, int, int], dtype: torch.dtype, device) -> torch.Tensor:
    """``[D*H*W, 3]`` normalised voxel coordinates, voxel i at i/(N-1)."""
    axes = [torch.linspace(0, 1, n, dtype=dtype, device=device) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def _chunk_contribution(grid, centres, prec, scales, intensities, amplitude: float, release_box: bool,
                        cutoff: float | None) -> torch.Tensor:
    """``[B, N]``: the summed contribution of one chunk of Gaussians to every voxel."""
    d = grid[None, None] - centres[:, :, None, :]  # [B, kc, N, 3]
    maha = torch.einsum("bkni,bkij,bknj->bkn", d, prec, d)  # [B, kc, N]
    weight = torch.exp(-0.5 * maha)
    if release_box:
        half = RELEASE_BOX_HALF_WIDTH * scales[:, :, None, :]
        weight = weight * (d.abs() <= half).all(-1)
    elif cutoff is not None:
        weight = weight * (maha <= cutoff * cutoff)
    return amplitude * torch.einsum("bk,bkn->bn", intensities, weight)


def render_reference(gaussians: GaussianSet, shape, *, cutoff: float | None = 3.0,
                     convention: str = "paper", max_pairs: int = 1 << 24) -> torch.Tensor:
    """Render ``[B, D, H, W]`` densely. ``cutoff=None`` sums every Gaussian everywhere.

    Gaussians are taken in chunks of about ``max_pairs`` (Gaussian, voxel) pairs; with
    gradients each chunk is checkpointed (recomputed in backward), so memory stays bounded.
    """
    gaussians = check_gaussians(gaussians)
    shape = check_shape(shape)
    cutoff = check_cutoff(cutoff)
    conv = get_convention(convention)
    grid = voxel_grid(shape, gaussians.dtype, gaussians.device)  # [N, 3]
    prec = effective_precisions(gaussians, conv)  # [B, k, 3, 3]
    batch, k = gaussians.batch_size, gaussians.num_gaussians
    out = gaussians.centres.new_zeros(batch, grid.shape[0])
    chunk = max(1, max_pairs // max(1, grid.shape[0] * batch))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in gaussians.tensors())
    for start in range(0, k, chunk):
        sl = slice(start, start + chunk)
        args = (grid, gaussians.centres[:, sl], prec[:, sl], gaussians.scales[:, sl], gaussians.intensities[:, sl],
                conv.amplitude, conv.release_box, cutoff)
        if needs_grad:
            out = out + checkpoint(_chunk_contribution, *args, use_reentrant=False)
        else:
            out = out + _chunk_contribution(*args)
    return out.reshape(batch, *shape)
