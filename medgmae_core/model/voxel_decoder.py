"""Voxel-MAE decoder (the baseline): mask tokens, a small transformer, a per-patch voxel head."""
from __future__ import annotations

import math

import torch
from torch import nn

from .configs import ModelConfig
from .vit import init_vit_weights, local_context, patch_coordinates, sincos_position_embedding_3d, transformer_blocks


class VoxelDecoder(nn.Module):
    """MAE decoder: fill masked positions with a shared mask token, unshuffle, add the decoder
    position embedding, run the blocks, predict ``prod(patch) * in_chans`` voxels per patch."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim = config.decoder_embed_dim
        self.decoder_embed = nn.Linear(config.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        pos = sincos_position_embedding_3d(config.grid_size, dim)[None]  # [1, L, dim]
        self.decoder_pos_embed = nn.Parameter(pos, requires_grad=False)
        self.decoder_blocks = transformer_blocks(dim, config.decoder_depth, config.decoder_num_heads, config.mlp_ratio)
        self.decoder_norm = nn.LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, math.prod(config.patch_size) * config.in_chans)
        self.context_radius = config.decoder_context_radius
        self.register_buffer("patch_coords", patch_coordinates(config.grid_size), persistent=False)  # [L, 3]
        self.context_proj = nn.Linear(dim, dim) if self.context_radius > 0 else None
        self.apply(init_vit_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent ``[B, 1 + L_keep, E]``, ids_restore ``[B, L]`` -> patch predictions ``[B, L, P]``."""
        x = self.decoder_embed(latent)  # [B, 1 + L_keep, dim]
        batch, length = ids_restore.shape
        n_mask = length - (x.shape[1] - 1)
        fill = self.mask_token.expand(batch, n_mask, -1)  # [B, L_mask, dim]
        if self.context_proj is not None and n_mask:
            order = torch.argsort(ids_restore, dim=1)  # [B, L]: kept patches first, then the masked ones
            visible_coords = self.patch_coords[order[:, :length - n_mask]]  # [B, L_keep, 3]
            masked_coords = self.patch_coords[order[:, length - n_mask:]]  # [B, L_mask, 3]
            context = local_context(masked_coords, visible_coords, x[:, 1:], self.context_radius)  # [B, L_mask, dim]
            fill = fill + self.context_proj(context)
        x_ = torch.cat([x[:, 1:], fill], dim=1)  # [B, L, dim] shuffled
        x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))  # [B, L, dim] patch order
        x = torch.cat([x[:, :1], x_ + self.decoder_pos_embed], dim=1)  # [B, 1 + L, dim]
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x[:, 1:])  # [B, L, P]
