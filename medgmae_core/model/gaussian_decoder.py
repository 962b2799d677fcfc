"""MedGMAE decoder: ``[cls, q_1..q_k, visible tokens]`` -> k Gaussians through four heads.

Two layouts (``ModelConfig.gaussian_layout``): ``"anchored"`` gives query ``j`` a fixed anchor on a
``g_D x g_H x g_W = k`` grid (its token carries the anchor's position; its centre and scale are bounded
around the anchor), ``"free"`` is the paper's and release's positionless query tokens with centres anywhere.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..gaussians import GaussianSet
from .configs import ModelConfig
from .precision import fp32_autocast_off
from .vit import (init_vit_weights, local_context, patch_coordinates, sincos_embedding_3d, sincos_position_embedding_3d,
                  transformer_blocks)

MIN_SCALE = 1e-4  # keeps sigmoid underflow from producing a zero scale (free layout)
SMALL_INIT_STD = 0.01  # anchored heads start close to their biases: every Gaussian at its anchor
PRIOR_EPS = 1e-3  # keeps the intensity prior's logit finite over air (b = 0) and above the peak


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def anchor_axes_voxels(config: ModelConfig) -> list[torch.Tensor]:
    """Per axis (D, H, W), the voxel coordinates ``[g]`` of the anchor cells' centres: cell ``c`` of ``g`` over
    ``N`` voxels is centred on voxel ``(c + 0.5) * N / g - 0.5``."""
    return [(torch.arange(g, dtype=torch.float64) + 0.5) * n / g - 0.5
            for n, g in zip(config.img_size, config.anchor_grid_shape)]


def anchor_grid(config: ModelConfig) -> torch.Tensor:
    """Anchor centres ``[k, 3]`` in normalised (D, H, W) coordinates (voxel / (N - 1)): the centres of the
    ``g_D x g_H x g_W`` cells that tile the window, row-major (:func:`anchor_axes_voxels`); for ``k = 512`` at
    96^3 each is exactly the centre of a patch."""
    axes = [voxel / (n - 1) for voxel, n in zip(anchor_axes_voxels(config), config.img_size)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # [k, 3]


def anchor_patch_coords(config: ModelConfig, anchors: torch.Tensor) -> torch.Tensor:
    """Normalised anchors ``[k, 3]`` -> patch-index units (patch ``p``'s centre is ``p``), for the embedding."""
    n = torch.tensor(config.img_size, dtype=torch.float64)
    p = torch.tensor(config.patch_size, dtype=torch.float64)
    return (anchors * (n - 1) + 0.5) / p - 0.5


def anchor_patch_index(config: ModelConfig, anchors: torch.Tensor) -> torch.Tensor:
    """The patch (row-major index into the ``L`` patches) that holds each anchor ``[k]``."""
    coords = anchor_patch_coords(config, anchors).round().long()  # [k, 3]
    gd, gh, gw = config.grid_size
    coords = torch.stack([coords[:, 0].clamp(0, gd - 1), coords[:, 1].clamp(0, gh - 1), coords[:, 2].clamp(0, gw - 1)], 1)
    return (coords[:, 0] * gh + coords[:, 1]) * gw + coords[:, 2]


class GaussianHeads(nn.Module):
    """Query features ``[B, k, dim]`` -> GaussianSet in head units (intensity in (0, 1)). Runs in fp32.

    ``"free"``: centre sigmoid over the window, scale sigmoid with bias ``logit(s0)``, rotation
    L2-normalised, intensity sigmoid with bias ``logit(I0)`` (the paper's heads with the coupled ``s0, I0``).
    ``"anchored"``: centre ``anchor + offset * h * tanh``, scale ``h * (lo + (hi - lo) * sigmoid)`` with
    the bias giving ``s0``; weights start small so every Gaussian starts at its anchor with scale ``s0``.
    """

    def __init__(self, dim: int, config: ModelConfig):
        super().__init__()
        self.layout = config.gaussian_layout
        self.head_centre = nn.Linear(dim, 3)
        self.head_scale = nn.Linear(dim, 3)
        self.head_rotation = nn.Linear(dim, 4)
        self.head_intensity = nn.Linear(dim, 1)
        for head in (self.head_centre, self.head_rotation, self.head_intensity):
            nn.init.xavier_uniform_(head.weight)
            nn.init.zeros_(head.bias)
        nn.init.normal_(self.head_scale.weight, std=0.01)
        # with the intensity prior the bias is a learnt global correction to it, starting at none
        nn.init.constant_(self.head_intensity.bias,
                          0.0 if config.intensity_prior_radius > 0 else _logit(config.initial_intensity))
        if self.layout == "anchored":
            lo, hi = config.min_scale_ratio, config.max_scale_ratio
            self.register_buffer("anchors", anchor_grid(config).float(), persistent=False)  # [k, 3]
            self.register_buffer("spacing", torch.tensor(config.anchor_spacing, dtype=torch.float32),
                                 persistent=False)  # [3]
            self.scale_range = (lo, hi)
            self.offset_ratio = config.anchor_offset_ratio
            nn.init.constant_(self.head_scale.bias, _logit((config.init_scale_ratio - lo) / (hi - lo)))
            nn.init.normal_(self.head_centre.weight, std=SMALL_INIT_STD)
            nn.init.normal_(self.head_intensity.weight, std=SMALL_INIT_STD)
        else:
            nn.init.constant_(self.head_scale.bias, _logit(config.initial_scale[0]))

    def forward(self, h: torch.Tensor, intensity_prior: torch.Tensor | None = None) -> GaussianSet:
        """``h [B, k, dim]``; ``intensity_prior [B, k]`` (head units, in (0, 1)): the intensity head predicts a
        logit correction to it."""
        with fp32_autocast_off(h.device.type):
            h = h.float()  # [B, k, dim]
            quats = F.normalize(self.head_rotation(h), dim=-1)  # [B, k, 4] unit (w, x, y, z)
            logits = self.head_intensity(h).squeeze(-1)  # [B, k]
            if intensity_prior is not None:
                logits = logits + torch.logit(intensity_prior.float(), eps=PRIOR_EPS)
            intensities = torch.sigmoid(logits)  # [B, k]
            if self.layout == "anchored":
                lo, hi = self.scale_range
                centres = self.anchors + self.offset_ratio * self.spacing * torch.tanh(self.head_centre(h))
                scales = self.spacing * (lo + (hi - lo) * torch.sigmoid(self.head_scale(h)))  # [B, k, 3]
            else:
                centres = torch.sigmoid(self.head_centre(h))  # [B, k, 3] in (0, 1)
                scales = torch.sigmoid(self.head_scale(h)).clamp_min(MIN_SCALE)  # [B, k, 3]
        return GaussianSet(centres, scales, quats, intensities)


class GaussianDecoder(nn.Module):
    """Projects the encoder output to the decoder width, puts ``k`` query tokens after the cls token
    (anchored: learnable embedding + the anchor's sine-cosine position; free: learnable, no position),
    adds the decoder position embedding to the visible tokens, runs the decoder blocks and reads the
    Gaussians off the query positions 1..k."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim = config.decoder_embed_dim
        self.num_gaussians = config.num_gaussians
        self.decoder_embed = nn.Linear(config.embed_dim, dim)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_gaussians, dim))
        pos = sincos_position_embedding_3d(config.grid_size, dim)[None]  # [1, L, dim]
        self.decoder_pos_embed = nn.Parameter(pos, requires_grad=False)
        if config.gaussian_layout == "anchored":
            anchors = anchor_patch_coords(config, anchor_grid(config))
            query_pos = sincos_embedding_3d(anchors, dim)[None]  # [1, k, dim]
        else:
            anchors = torch.full((config.num_gaussians, 3), float("nan"))
            query_pos = torch.zeros(1, config.num_gaussians, dim)
        self.register_buffer("query_pos_embed", query_pos, persistent=False)
        self.context_radius = config.decoder_context_radius if config.gaussian_layout == "anchored" else 0.0
        self.register_buffer("query_coords", anchors.float(), persistent=False)  # [k, 3] patch units
        self.register_buffer("patch_coords", patch_coordinates(config.grid_size), persistent=False)  # [L, 3]
        self.context_proj = nn.Linear(dim, dim) if self.context_radius > 0 else None
        self.prior_radius = config.intensity_prior_radius
        self.prior_from_levels = config.intensity_prior_sigma > 0
        self.peak_value = config.peak_value
        self.decoder_blocks = transformer_blocks(dim, config.decoder_depth, config.decoder_num_heads, config.mlp_ratio)
        self.decoder_norm = nn.LayerNorm(dim)
        self.apply(init_vit_weights)
        nn.init.normal_(self.query_tokens, std=0.02)
        self.heads = GaussianHeads(dim, config)  # after apply(): keeps its own initialisation

    def intensity_prior(self, patch_means: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Patch means ``[B, L]`` of the input -> head-unit prior ``[B, k]``: the local mean of the visible
        patches around each anchor, divided by ``peak_value`` (see ``ModelConfig``, intensity prior)."""
        visible_coords = self.patch_coords[ids_keep]  # [B, L_keep, 3]
        visible_means = torch.gather(patch_means.float(), 1, ids_keep)[..., None]  # [B, L_keep, 1]
        level = local_context(self.query_coords, visible_coords, visible_means, self.prior_radius)  # [B, k, 1]
        return (level[..., 0] / self.peak_value).clamp(PRIOR_EPS, 1 - PRIOR_EPS)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor, patch_means: torch.Tensor | None = None
                ) -> tuple[GaussianSet, torch.Tensor, torch.Tensor]:
        """latent ``[B, 1 + L_keep, E]``, ids_restore ``[B, L]``, patch_means ``[B, L]`` (the input's mean per
        patch; needed by the intensity prior, ignored without it; with the interpolation prior, the level at each
        anchor ``[B, k]`` instead) ->
        (Gaussians ``k``, query features ``[B, k, dim]``, context ``[B, 1 + L_keep, dim]``: the
        decoded cls and visible tokens, for MedGMAE*'s residual levels)."""
        x = self.decoder_embed(latent)  # [B, 1 + L_keep, dim]
        batch, n_keep = x.shape[0], x.shape[1] - 1
        ids_keep = torch.argsort(ids_restore, dim=1)[:, :n_keep]  # [B, L_keep]: the visible patches
        pos = self.decoder_pos_embed.expand(batch, -1, -1)
        pos = torch.gather(pos, 1, ids_keep[..., None].expand(-1, -1, pos.shape[-1]))  # [B, L_keep, dim]
        queries = (self.query_tokens + self.query_pos_embed).expand(batch, -1, -1)  # [B, k, dim]
        if self.context_proj is not None:
            visible_coords = self.patch_coords[ids_keep]  # [B, L_keep, 3]
            context = local_context(self.query_coords, visible_coords, x[:, 1:], self.context_radius)  # [B, k, dim]
            queries = queries + self.context_proj(context)
        x = torch.cat([x[:, :1], queries, x[:, 1:] + pos], dim=1)  # [B, 1 + k + L_keep, dim]
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)
        k = self.num_gaussians
        query_features = x[:, 1:1 + k]  # [B, k, dim]
        context = torch.cat([x[:, :1], x[:, 1 + k:]], dim=1)  # [B, 1 + L_keep, dim]
        prior = None
        if self.prior_radius > 0:
            if patch_means is None:
                raise ValueError("this model's intensity prior needs patch_means [B, L] (the input's mean per patch)")
            if self.prior_from_levels:
                prior = (patch_means.float() / self.peak_value).clamp(PRIOR_EPS, 1 - PRIOR_EPS)  # [B, k]
            else:
                prior = self.intensity_prior(patch_means, ids_keep)  # [B, k]
        return self.heads(query_features, prior), query_features, context
