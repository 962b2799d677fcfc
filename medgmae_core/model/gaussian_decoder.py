"""MedGMAE decoder: ``[cls, q_1..q_k, visible tokens]`` -> k Gaussians through four heads."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..gaussians import GaussianSet
from .configs import ModelConfig
from .vit import init_vit_weights, sincos_position_embedding_3d, transformer_blocks

SCALE_BIAS = -1.386  # sigmoid(-1.386) ~= 0.2: initial sigma is 0.2 of the volume side
INTENSITY_BIAS = -0.405  # sigmoid(-0.405) ~= 0.4
MIN_SCALE = 1e-4  # keeps sigmoid underflow from producing a zero scale


def fp32_autocast_off(device_type: str):
    """Context manager: autocast disabled (heads and renderer run in fp32)."""
    return torch.autocast(device_type=device_type, enabled=False)


class GaussianHeads(nn.Module):
    """Query features ``[B, k, dim]`` -> GaussianSet: centre sigmoid, scale sigmoid,
    rotation L2-normalised, intensity sigmoid (initialisations from MEDGMAE.md). Runs in fp32."""

    def __init__(self, dim: int):
        super().__init__()
        self.head_centre = nn.Linear(dim, 3)
        self.head_scale = nn.Linear(dim, 3)
        self.head_rotation = nn.Linear(dim, 4)
        self.head_intensity = nn.Linear(dim, 1)
        for head in (self.head_centre, self.head_rotation, self.head_intensity):
            nn.init.xavier_uniform_(head.weight)
            nn.init.zeros_(head.bias)
        nn.init.normal_(self.head_scale.weight, std=0.01)
        nn.init.constant_(self.head_scale.bias, SCALE_BIAS)
        nn.init.constant_(self.head_intensity.bias, INTENSITY_BIAS)

    def forward(self, h: torch.Tensor) -> GaussianSet:
        with fp32_autocast_off(h.device.type):
            h = h.float()  # [B, k, dim]
            centres = torch.sigmoid(self.head_centre(h))  # [B, k, 3] in (0, 1)
            scales = torch.sigmoid(self.head_scale(h)).clamp_min(MIN_SCALE)  # [B, k, 3]
            quats = F.normalize(self.head_rotation(h), dim=-1)  # [B, k, 4] unit (w, x, y, z)
            intensities = torch.sigmoid(self.head_intensity(h)).squeeze(-1)  # [B, k]
        return GaussianSet(centres, scales, quats, intensities)


class GaussianDecoder(nn.Module):
    """Projects the encoder output to the decoder width, prepends ``k`` learnable queries (no
    position) after the cls token, adds the decoder position embedding to the visible tokens,
    runs the decoder blocks and reads the Gaussians off the query positions 1..k."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim = config.decoder_embed_dim
        self.num_gaussians = config.num_gaussians
        self.decoder_embed = nn.Linear(config.embed_dim, dim)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_gaussians, dim))
        pos = sincos_position_embedding_3d(config.grid_size, dim)[None]  # [1, L, dim]
        self.decoder_pos_embed = nn.Parameter(pos, requires_grad=False)
        self.decoder_blocks = transformer_blocks(dim, config.decoder_depth, config.decoder_num_heads, config.mlp_ratio)
        self.decoder_norm = nn.LayerNorm(dim)
        self.apply(init_vit_weights)
        nn.init.normal_(self.query_tokens, std=0.02)
        self.heads = GaussianHeads(dim)  # after apply(): keeps its own initialisation

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor
                ) -> tuple[GaussianSet, torch.Tensor, torch.Tensor]:
        """latent ``[B, 1 + L_keep, E]``, ids_restore ``[B, L]`` ->
        (Gaussians ``k``, query features ``[B, k, dim]``, context ``[B, 1 + L_keep, dim]``: the
        decoded cls and visible tokens, for MedGMAE*'s residual levels)."""
        x = self.decoder_embed(latent)  # [B, 1 + L_keep, dim]
        batch, n_keep = x.shape[0], x.shape[1] - 1
        ids_keep = torch.argsort(ids_restore, dim=1)[:, :n_keep]  # [B, L_keep]: the visible patches
        pos = self.decoder_pos_embed.expand(batch, -1, -1)
        pos = torch.gather(pos, 1, ids_keep[..., None].expand(-1, -1, pos.shape[-1]))  # [B, L_keep, dim]
        queries = self.query_tokens.expand(batch, -1, -1)  # [B, k, dim]
        x = torch.cat([x[:, :1], queries, x[:, 1:] + pos], dim=1)  # [B, 1 + k + L_keep, dim]
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)
        k = self.num_gaussians
        query_features = x[:, 1:1 + k]  # [B, k, dim]
        context = torch.cat([x[:, :1], x[:, 1 + k:]], dim=1)  # [B, 1 + L_keep, dim]
        return self.heads(query_features), query_features, context
