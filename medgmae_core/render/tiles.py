"""Device-agnostic torch renderer: 8^3 tiles, GEMM-shaped features, exact cut-off.

The volume is cut into T^3 tiles (T = 8). Every (Gaussian, tile) pair whose
bounding box meets the tile is enumerated; for a pair with the Gaussian centre c
in tile-local voxel coordinates, the Mahalanobis form over the tile's voxels u is

    -q(u)/2 = -(u^T P u - 2 c^T P u + c^T P c)/2 = phi(u) . psi(P, c)

with ten fixed features phi(u) = (u0^2, u1^2, u2^2, 2u0u1, 2u0u2, 2u1u2, u0, u1, u2, 1),
so a chunk of pairs is one ``[pairs, 10] @ [10, T^3]`` matrix product. Voxels
outside the r-sigma ellipsoid (or outside the clip box, e.g. the release's
unrotated box) are masked exactly. Chunks are checkpointed, so memory stays
bounded in forward and backward, and only plain tensor ops are used, so it runs
unchanged on CUDA.
"""
from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from .geometry import axis_scale, ellipsoid_boxes, intersect_boxes

TILE = 8
MAX_CHUNK_ELEMENTS = 1 << 21  # pairs * T^3 per chunk: bounds every temporary to ~8 MB in float32


def tile_features(tile: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``[T^3, 10]`` quadratic features of the tile-local voxel coordinates."""
    r = torch.arange(tile, dtype=dtype, device=device)
    u = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)  # [T^3, 3]
    u0, u1, u2 = u.unbind(-1)
    return torch.stack([u0 * u0, u1 * u1, u2 * u2, 2 * u0 * u1, 2 * u0 * u2, 2 * u1 * u2,
                        u0, u1, u2, torch.ones_like(u0)], dim=-1)


def enumerate_pairs(boxes: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat Gaussian index ``[P]``, tile coordinates ``[P, 3]``) of every (Gaussian, tile) pair
    whose voxel box ``[B,k,3,2]`` meets the tile."""
    flat = boxes.reshape(-1, 3, 2)
    valid = (flat[..., 1] >= flat[..., 0]).all(-1)  # [B*k]
    t_lo = torch.div(flat[..., 0], tile, rounding_mode="floor")
    ext = (torch.div(flat[..., 1], tile, rounding_mode="floor") - t_lo + 1).clamp(min=0)  # [B*k, 3]
    count = ext.prod(-1) * valid
    gid = torch.repeat_interleave(torch.arange(flat.shape[0], device=boxes.device), count)  # [P]
    start = torch.cumsum(count, 0) - count
    local = torch.arange(gid.shape[0], device=boxes.device) - start[gid]
    e = ext[gid]
    tz = local % e[:, 2]
    ty = torch.div(local, e[:, 2], rounding_mode="floor") % e[:, 1]
    tx = torch.div(local, e[:, 2] * e[:, 1], rounding_mode="floor")
    return gid, torch.stack([tx, ty, tz], dim=-1) + t_lo[gid]


def _splat_chunk(centres_v, prec_v, amps, gid, tiles, box, phi, r2: float, tile: int, log_amps: bool):
    """``[C, T^3]`` contributions of one chunk of (Gaussian, tile) pairs.

    The GEMM gives the exponent -q/2 directly (plus log(amp) when all amplitudes are
    positive, saving a pass over the chunk). ``box`` (``[C,3,2]`` voxel ranges) is tested
    per voxel only when given: the paper convention needs just the ellipsoid (voxels past
    the volume edge are cropped later).
    """
    c = centres_v[gid] - tiles * tile  # [C, 3] centre in tile-local voxel units
    p = prec_v[gid]  # [C, 3, 3]
    pc = (p @ c[..., None])[..., 0]  # [C, 3]
    a = amps[gid]  # [C]
    const = -0.5 * (c * pc).sum(-1)
    if log_amps:
        const = const + torch.log(a)
    psi = torch.stack([-0.5 * p[:, 0, 0], -0.5 * p[:, 1, 1], -0.5 * p[:, 2, 2], -0.5 * p[:, 0, 1],
                       -0.5 * p[:, 0, 2], -0.5 * p[:, 1, 2], pc[:, 0], pc[:, 1], pc[:, 2], const], dim=-1)  # [C, 10]
    e = psi @ phi.T  # [C, T^3] exponent: -q/2 (+ log a)
    outside = None
    if math.isfinite(r2):
        floor = (-0.5 * r2) + (torch.log(a).detach() if log_amps else 0.0)
        outside = e < (floor[:, None] if log_amps else floor)
    if box is not None:
        idx = tiles[:, :, None] * tile + torch.arange(tile, device=tiles.device)  # [C, 3, T]
        inside = (idx >= box[:, :, 0:1]) & (idx <= box[:, :, 1:2])  # [C, 3, T]
        in_box = (inside[:, 0, :, None, None] & inside[:, 1, None, :, None] & inside[:, 2, None, None, :])
        outside = ~in_box.reshape(e.shape) if outside is None else outside | ~in_box.reshape(e.shape)
    if outside is not None:
        e = e.masked_fill_(outside, -math.inf)  # exp(-inf) = 0, with a zero gradient
    weight = torch.exp(e)
    return weight if log_amps else a[:, None] * weight


def render_tiles(centres: torch.Tensor, precisions: torch.Tensor, amps: torch.Tensor, clip: torch.Tensor,
                 shape: tuple[int, int, int], radius: float, *, tile: int = TILE,
                 max_chunk_elements: int = MAX_CHUNK_ELEMENTS, clip_is_volume: bool = False) -> torch.Tensor:
    """``[B,D,H,W]``: sum of amps*exp(-d^T P d / 2) over voxels inside the radius-sigma ellipsoid
    (``radius=inf``: no ellipsoid test) and inside ``clip`` (``[B,k,3,2]`` inclusive voxel ranges).
    ``clip_is_volume=True`` says ``clip`` is the whole volume, which skips the per-voxel box test.

    centres ``[B,k,3]`` and precisions ``[B,k,3,3]`` are in normalised units; differentiable in
    centres, precisions and amps.
    """
    batch, k = centres.shape[:2]
    scale = axis_scale(shape, centres)  # [3]
    centres_v = (centres * scale).reshape(-1, 3)  # [B*k, 3] voxel units
    prec_v = (precisions / (scale[:, None] * scale[None, :])).reshape(-1, 3, 3)
    amps_f = amps.reshape(-1)
    boxes = clip
    if math.isfinite(radius):
        boxes = intersect_boxes(clip, ellipsoid_boxes(centres.detach(), precisions.detach(), shape, radius))
    gid, tiles = enumerate_pairs(boxes, tile)
    box_f = boxes.reshape(-1, 3, 2)
    ntiles = [-(-n // tile) for n in shape]
    out = centres.new_zeros(batch * ntiles[0] * ntiles[1] * ntiles[2], tile ** 3)
    phi = tile_features(tile, centres.dtype, centres.device)
    r2 = radius * radius
    chunk = max(1, max_chunk_elements // tile ** 3)
    log_amps = bool((amps > 0).all()) if amps.numel() else False
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (centres, precisions, amps))
    for start in range(0, gid.shape[0], chunk):
        g = gid[start:start + chunk]
        t = tiles[start:start + chunk]
        b = torch.div(g, k, rounding_mode="floor")
        slot = ((b * ntiles[0] + t[:, 0]) * ntiles[1] + t[:, 1]) * ntiles[2] + t[:, 2]
        args = (centres_v, prec_v, amps_f, g, t, None if clip_is_volume else box_f[g], phi, r2, tile, log_amps)
        contrib = checkpoint(_splat_chunk, *args, use_reentrant=False) if needs_grad else _splat_chunk(*args)
        out.index_put_((slot,), contrib, accumulate=True)  # unlike index_add_, saves only the index for backward
    vol = out.reshape(batch, ntiles[0], ntiles[1], ntiles[2], tile, tile, tile)
    vol = vol.permute(0, 1, 4, 2, 5, 3, 6).reshape(batch, ntiles[0] * tile, ntiles[1] * tile, ntiles[2] * tile)
    return vol[:, :shape[0], :shape[1], :shape[2]]
