"""MedGMAE*: residual densification levels. Each child refines a base Gaussian with tanh-bounded residuals.

As the paper's Eq. 4, every level is written relative to level 0: for child ``i`` of level ``l`` with base
Gaussian ``b = i // m_l`` (mu_0, s_0, q_0, I_0) and child feature h:

    s   = max(s_0 + step * tanh(a_s(h)) - delta_s_l, s_min)
    mu  = mu_0 + sigma_mu * tanh(a_mu(h))
    I   = I_0 + sigma_I * tanh(a_I(h))
    q   = normalise(q_0 + sigma_q * tanh(a_q(h)))

``star_relative_to="parent"`` uses the level above instead of level 0 (a variant). The step, shrink and
sigma values and their reasoning are documented on :class:`~medgmae_core.model.configs.ModelConfig`.
Centres and intensities are not clamped: a child may leave [0, 1] by at most ``sigma_mu``.

Child features: each child starts from its parent's feature plus a learnable per-child
embedding, then one transformer block lets all children attend to each other (self-attention)
and to the decoder's cls + visible tokens (cross-attention), so detail comes from the image.
The residual heads start small (weights N(0, 0.01), zero bias): at initialisation a child is
its parent, shrunk by ``delta_s``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import TransformerBlock
from torch import nn

from ..gaussians import GaussianSet
from .precision import fp32_autocast_off
from .vit import init_vit_weights


class ResidualLevel(nn.Module):
    """One level: ``children`` Gaussians per parent, refined by bounded residuals."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, children: int, *, scale_shrink: float,
                 scale_step: float, min_scale: float, sigma_centre: float, sigma_intensity: float,
                 sigma_rotation: float):
        super().__init__()
        self.children_per_parent = children
        self.scale_shrink = scale_shrink
        self.scale_step = scale_step
        self.min_scale = min_scale
        self.sigma_centre = sigma_centre
        self.sigma_intensity = sigma_intensity
        self.sigma_rotation = sigma_rotation
        self.child_embed = nn.Parameter(torch.zeros(1, 1, children, dim))
        self.block = TransformerBlock(dim, int(dim * mlp_ratio), num_heads, qkv_bias=True,
                                      with_cross_attention=True, use_flash_attention=True)
        self.norm = nn.LayerNorm(dim)
        self.delta_centre = nn.Linear(dim, 3)
        self.delta_scale = nn.Linear(dim, 3)
        self.delta_rotation = nn.Linear(dim, 4)
        self.delta_intensity = nn.Linear(dim, 1)
        self.apply(init_vit_weights)
        nn.init.normal_(self.child_embed, std=0.02)
        for head in (self.delta_centre, self.delta_scale, self.delta_rotation, self.delta_intensity):
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)

    def forward(self, reference: GaussianSet, parent_features: torch.Tensor, context: torch.Tensor
                ) -> tuple[GaussianSet, torch.Tensor]:
        """reference (the ``n0`` base Gaussians, or the ``n`` parents for ``star_relative_to="parent"``),
        parent_features ``[B, n, dim]``, context ``[B, T, dim]`` -> (children ``n * m``, child features
        ``[B, n * m, dim]``); child ``i*m + j`` belongs to parent ``i`` and to reference ``(i*m + j) // (n*m/n_ref)``."""
        batch, n, dim = parent_features.shape
        m = self.children_per_parent
        h = parent_features[:, :, None] + self.child_embed  # [B, n, m, dim]
        h = h.reshape(batch, n * m, dim)  # [B, n*m, dim]
        h = self.block(h, context=context)  # [B, n*m, dim]
        h_norm = self.norm(h)
        per_reference = n * m // reference.num_gaussians

        def expand(t: torch.Tensor) -> torch.Tensor:  # [B, n_ref, ...] -> [B, n*m, ...]
            return t.repeat_interleave(per_reference, dim=1)

        with fp32_autocast_off(h.device.type):
            h_norm = h_norm.float()
            scales = expand(reference.scales) + self.scale_step * torch.tanh(self.delta_scale(h_norm)) - self.scale_shrink
            scales = scales.clamp_min(self.min_scale)  # [B, n*m, 3]
            centres = expand(reference.centres) + self.sigma_centre * torch.tanh(self.delta_centre(h_norm))  # [B, n*m, 3]
            intensities = expand(reference.intensities) + self.sigma_intensity * torch.tanh(
                self.delta_intensity(h_norm)).squeeze(-1)  # [B, n*m]
            quats = F.normalize(expand(reference.unit_quaternions())
                                + self.sigma_rotation * torch.tanh(self.delta_rotation(h_norm)), dim=-1)  # [B, n*m, 4]
        return GaussianSet(centres, scales, quats, intensities), h


def build_residual_levels(config) -> nn.ModuleList:
    """Levels 1 and 2 of MedGMAE*: ``m1`` children per base Gaussian, then ``m2 / m1`` per level-1 Gaussian."""
    m1, m2 = config.star_multipliers
    shrink1, shrink2 = config.star_level_shrinks
    common = dict(scale_step=config.star_scale_range, min_scale=config.star_min_scale,
                  sigma_centre=config.star_centre_range, sigma_intensity=config.star_sigma_intensity,
                  sigma_rotation=config.star_sigma_rotation)
    dim, heads = config.decoder_embed_dim, config.decoder_num_heads
    return nn.ModuleList([
        ResidualLevel(dim, heads, config.mlp_ratio, m1, scale_shrink=shrink1, **common),
        ResidualLevel(dim, heads, config.mlp_ratio, m2 // m1, scale_shrink=shrink2, **common),
    ])
