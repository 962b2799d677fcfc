"""Voxel-unit quantities shared by the fast backends (tile torch path and Numba kernel).

Normalised coordinates run over [0, 1] per axis with voxel i at i/(N-1), so a
normalised offset d maps to voxel units as d * (N-1) per axis. Both fast paths
work in voxel units; gradients flow back through these torch ops.
"""
from __future__ import annotations

import torch

from ..gaussians import GaussianSet
from .conventions import RELEASE_BOX_HALF_WIDTH, Convention, effective_precisions

NO_CUTOFF = float("inf")


def axis_scale(shape: tuple[int, int, int], like: torch.Tensor) -> torch.Tensor:
    """``[3]`` voxels per normalised unit, (N-1) per axis."""
    return torch.tensor([n - 1 for n in shape], dtype=like.dtype, device=like.device)


def render_inputs(gaussians: GaussianSet, conv: Convention) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(centres ``[B,k,3]``, normalised precisions ``[B,k,3,3]``, amplitudes c*I ``[B,k]``), differentiable."""
    return gaussians.centres, effective_precisions(gaussians, conv), conv.amplitude * gaussians.intensities


def release_boxes(centres: torch.Tensor, scales: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """``[..., 3, 2]`` inclusive voxel index range (lo, hi) per axis of the release kernel's box; lo > hi: empty.

    The rule of the release's CUDA kernel (see ``release_reference.py`` for the reading of it), in float32 like
    the kernel whatever the input dtype: ``mean = mu * N`` (N, not N - 1), ``expand = (2 * s) * N`` from the
    unrotated scales, ``lo = max(0, trunc(mean - expand))``, ``hi = min(N - 1, trunc(mean + expand))`` with
    ``trunc`` toward zero like C's ``(int)``. Not differentiable (a constant of the render, as in the release).
    """
    with torch.no_grad():
        n = torch.tensor(shape, dtype=torch.float32, device=centres.device)
        mean = centres.detach().float() * n
        expand = (RELEASE_BOX_HALF_WIDTH * scales.detach().float()) * n
        top = n - 1
        # clamping after trunc is the kernel's max/min; the extra bounds (lo <= N, hi >= -1) keep far-away
        # boxes empty and the int64 cast in range without changing any non-empty box
        lo = torch.trunc(mean - expand).clamp(min=0).minimum(n)
        hi = torch.trunc(mean + expand).minimum(top).clamp(min=-1)
        return torch.stack([lo, hi], dim=-1).to(torch.int64)


def clip_boxes(gaussians: GaussianSet, shape: tuple[int, int, int], conv: Convention) -> torch.Tensor:
    """``[B,k,3,2]`` inclusive integer voxel range (lo, hi) per axis that a Gaussian may touch
    before the ellipsoid test: the whole volume for the paper convention (the ellipsoid
    itself bounds the work), the release kernel's box otherwise (``release_boxes``). Empty when lo > hi.
    """
    g = gaussians.detach()
    batch, k = g.batch_size, g.num_gaussians
    if not conv.release_box:
        top = torch.tensor([n - 1 for n in shape], device=g.device, dtype=torch.int64)
        lo = torch.zeros(batch, k, 3, dtype=torch.int64, device=g.device)
        return torch.stack([lo, top.expand(batch, k, 3)], dim=-1)
    return release_boxes(g.centres, g.scales, shape)


def ellipsoid_boxes(centres: torch.Tensor, precisions: torch.Tensor, shape: tuple[int, int, int],
                    radius: float, margin: float = 1e-3) -> torch.Tensor:
    """``[B,k,3,2]`` integer voxel range bounding each radius-sigma ellipsoid (clipped to the volume).

    Half-width along axis a is radius*sqrt(Sigma_aa) with Sigma the inverse precision;
    ``margin`` (voxels) keeps it conservative, the exact test happens per voxel.
    """
    scale = axis_scale(shape, centres)
    with torch.no_grad():
        sigma_diag = torch.linalg.inv(precisions.double()).diagonal(dim1=-2, dim2=-1).to(centres.dtype)
        half = radius * sigma_diag.clamp(min=0).sqrt() * scale + margin
        centre = centres * scale
        top = torch.tensor([n - 1 for n in shape], device=centres.device, dtype=torch.int64)
        lo = torch.ceil(centre - half).to(torch.int64).clamp(min=0)
        hi = torch.minimum(torch.floor(centre + half).to(torch.int64), top)
    return torch.stack([lo, hi], dim=-1)


def intersect_boxes(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.maximum(a[..., 0], b[..., 0]), torch.minimum(a[..., 1], b[..., 1])], dim=-1)
