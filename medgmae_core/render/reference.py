"""Dense reference renderer: slow and obviously right; the truth the fast paths are tested against.

Evaluates every (Gaussian, voxel) pair, then keeps those inside the cut-off:
the r-sigma ellipsoid for the paper convention, the release kernel's voxel box
(``geometry.release_boxes``, checked against the literal port in
``release_reference.py``) otherwise. Runs in any dtype (use float64 for
gradcheck) and on any device.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..gaussians import GaussianSet
from .conventions import check_cutoff, check_gaussians, check_shape, effective_precisions, get_convention
from .geometry import release_boxes


def voxel_grid(shape: tuple[int, int, int], dtype: torch.dtype, device) -> torch.Tensor:
    """``[D*H*W, 3]`` normalised voxel coordinates, voxel i at i/(N-1)."""
    axes = [torch.linspace(0, 1, n, dtype=dtype, device=device) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def voxel_indices(shape: tuple[int, int, int], device) -> torch.Tensor:
    """``[D*H*W, 3]`` integer voxel indices, in the order of ``voxel_grid``."""
    axes = [torch.arange(n, device=device) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def _chunk_contribution(grid, index, centres, prec, boxes, intensities, amplitude: float,
                        cutoff: float | None) -> torch.Tensor:
    """``[B, N]``: the summed contribution of one chunk of Gaussians to every voxel.

    ``boxes`` (``[B, kc, 3, 2]`` inclusive voxel ranges, release convention) replaces the cut-off when given.
    """
    d = grid[None, None] - centres[:, :, None, :]  # [B, kc, N, 3]
    maha = torch.einsum("bkni,bkij,bknj->bkn", d, prec, d)  # [B, kc, N]
    weight = torch.exp(-0.5 * maha)
    if boxes is not None:
        inside = ((index >= boxes[:, :, None, :, 0]) & (index <= boxes[:, :, None, :, 1])).all(-1)
        weight = weight * inside
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
    boxes = index = None
    if conv.release_box:
        boxes = release_boxes(gaussians.centres, gaussians.scales, shape)  # [B, k, 3, 2]
        index = voxel_indices(shape, gaussians.device)  # [N, 3]
    batch, k = gaussians.batch_size, gaussians.num_gaussians
    out = gaussians.centres.new_zeros(batch, grid.shape[0])
    chunk = max(1, max_pairs // max(1, grid.shape[0] * batch))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in gaussians.tensors())
    for start in range(0, k, chunk):
        sl = slice(start, start + chunk)
        args = (grid, index, gaussians.centres[:, sl], prec[:, sl], None if boxes is None else boxes[:, sl],
                gaussians.intensities[:, sl], conv.amplitude, cutoff)
        if needs_grad:
            out = out + checkpoint(_chunk_contribution, *args, use_reentrant=False)
        else:
            out = out + _chunk_contribution(*args)
    return out.reshape(batch, *shape)
