"""MedGMAE, MedGMAE* and the voxel-MAE baseline on one masked 3D ViT encoder.

Volumes are ``[B, C, D, H, W]`` HU-windowed to [0, 1]; ``L`` patches in row-major (d, h, w)
order; masks are ``[B, L]`` with 1 = masked (hidden from the encoder).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..gaussians import GaussianSet
from ..render import render_volume
from .configs import ModelConfig
from .gaussian_decoder import GaussianDecoder, fp32_autocast_off
from .residual_levels import build_residual_levels
from .vit import ViTEncoder3D, random_masking
from .voxel_decoder import VoxelDecoder

NO_DECAY_TOKENS = ("cls_token", "query_tokens", "mask_token", "child_embed")


@dataclass
class ModelOutput:
    loss: torch.Tensor  # scalar
    pred: torch.Tensor  # [B, 1, D, H, W] predicted volume (C channels for voxel-MAE)
    mask: torch.Tensor  # [B, L], 1 = masked patch
    gaussians: GaussianSet | None = None  # Gaussian models: the rendered set (finest level for MedGMAE*)
    levels: list[GaussianSet] | None = None  # MedGMAE*: every level, coarse to fine


class MaskedAutoencoder3D(nn.Module):
    """What MedGMAE and voxel-MAE share: the encoder, patch bookkeeping, masks, input checks."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = ViTEncoder3D(config.img_size, config.patch_size, config.in_chans, config.embed_dim,
                                    config.depth, config.num_heads, config.mlp_ratio)

    # ------------------------------------------------------------ patches
    @property
    def num_patches(self) -> int:
        return self.config.num_patches

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """``[B, C, D, H, W]`` -> ``[B, L, pd*ph*pw*C]`` (voxels of a patch in (pd, ph, pw, c) order)."""
        (gd, gh, gw), (pd, ph, pw) = self.config.grid_size, self.config.patch_size
        b, c = imgs.shape[:2]
        x = imgs.reshape(b, c, gd, pd, gh, ph, gw, pw)
        x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # [B, gd, gh, gw, pd, ph, pw, C]
        return x.reshape(b, gd * gh * gw, pd * ph * pw * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, pd*ph*pw*C]`` -> ``[B, C, D, H, W]``; inverse of :meth:`patchify`."""
        (gd, gh, gw), (pd, ph, pw) = self.config.grid_size, self.config.patch_size
        b = x.shape[0]
        c = x.shape[-1] // (pd * ph * pw)
        x = x.reshape(b, gd, gh, gw, pd, ph, pw, c)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, gd, pd, gh, ph, gw, pw]
        return x.reshape(b, c, gd * pd, gh * ph, gw * pw)

    def mask_volume(self, mask: torch.Tensor) -> torch.Tensor:
        """Patch mask ``[B, L]`` -> voxel mask ``[B, 1, D, H, W]`` (1 inside masked patches)."""
        (gd, gh, gw), (pd, ph, pw) = self.config.grid_size, self.config.patch_size
        m = mask.reshape(mask.shape[0], 1, gd, gh, gw)
        return m.repeat_interleave(pd, 2).repeat_interleave(ph, 3).repeat_interleave(pw, 4)

    def random_masking(self, x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None):
        """``[B, L, C]`` -> (kept ``[B, L_keep, C]``, mask ``[B, L]``, ids_restore ``[B, L]``)."""
        return random_masking(x, mask_ratio, generator)

    # ------------------------------------------------------------ encoder
    def check_input(self, imgs: torch.Tensor) -> None:
        want = (self.config.in_chans, *self.config.img_size)
        if not isinstance(imgs, torch.Tensor) or imgs.dim() != 5 or tuple(imgs.shape[1:]) != want:
            got = list(imgs.shape) if isinstance(imgs, torch.Tensor) else type(imgs).__name__
            raise ValueError(f"imgs must have shape [B, {want[0]}, {want[1]}, {want[2]}, {want[3]}] "
                             f"(in_chans, img_size of the model config), got {got}")
        if not imgs.is_floating_point():
            raise ValueError(f"imgs must be a floating-point tensor, got dtype {imgs.dtype}")

    def resolve_mask_ratio(self, mask_ratio: float | None) -> float:
        ratio = self.config.mask_ratio if mask_ratio is None else float(mask_ratio)
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {ratio}")
        return ratio

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float | None = None,
                        generator: torch.Generator | None = None):
        """imgs ``[B, C, D, H, W]`` -> (latent ``[B, 1 + L_keep, E]``, mask ``[B, L]``, ids_restore ``[B, L]``)."""
        return self.encoder(imgs, self.resolve_mask_ratio(mask_ratio), generator)

    # ----------------------------------------------------------- training
    def no_weight_decay(self) -> set[str]:
        """Names of parameters excluded from weight decay: norms, biases, tokens, position embeddings."""
        names = set()
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.ndim <= 1 or leaf in NO_DECAY_TOKENS or "pos_embed" in leaf or "position_embeddings" in leaf:
                names.add(name)
        return names

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups over trainable parameters: ``weight_decay`` on weights, 0 on :meth:`no_weight_decay`."""
        skip = self.no_weight_decay()
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if name in skip else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    @staticmethod
    def masked_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Mean of ``values`` where ``weight`` (broadcast, 0/1) is 1; the plain mean when
        nothing is masked (``mask_ratio=0``)."""
        values = values.float()
        weight = weight.float().expand_as(values)
        total = weight.sum()
        masked = (values * weight).sum() / total.clamp_min(1.0)
        return torch.where(total > 0, masked, values.mean())  # no host sync


class MedGMAE(MaskedAutoencoder3D):
    """Gaussian MAE. ``objective="gaussian"``: k Gaussians per volume; ``"gaussian_star"``:
    MedGMAE*, base Gaussians refined by two residual levels (see :mod:`.residual_levels`)."""

    def __init__(self, config: ModelConfig):
        if not config.is_gaussian:
            raise ValueError(f"MedGMAE needs objective 'gaussian' or 'gaussian_star', got {config.objective!r}")
        super().__init__(config)
        self.decoder = GaussianDecoder(config)
        self.levels = build_residual_levels(config) if config.objective == "gaussian_star" else nn.ModuleList()

    @property
    def num_output_gaussians(self) -> int:
        """Gaussians in ``ModelOutput.gaussians`` / ``predict_gaussians``."""
        n0 = self.config.num_gaussians
        if not len(self.levels):
            return n0
        m1, m2 = self.config.star_multipliers
        return n0 * (1 + m1 + m2) if self.config.star_combine == "sum" else n0 * m2

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> list[GaussianSet]:
        """-> Gaussian sets coarse to fine, in rendered units (see :meth:`to_volume_units`):
        ``[k]`` for MedGMAE, ``[N0, m1*N0, m2*N0]`` for MedGMAE*."""
        gaussians, features, context = self.decoder(latent, ids_restore)  # head units
        sets = [gaussians]
        for level in self.levels:
            gaussians, features = level(gaussians, features, context)
            sets.append(gaussians)
        return [self.to_volume_units(g) for g in sets]

    def to_volume_units(self, gaussians: GaussianSet) -> GaussianSet:
        """Head-unit intensities (0, 1) -> rendered units: times ``config.intensity_scale``."""
        scale = self.config.intensity_scale
        return GaussianSet(gaussians.centres, gaussians.scales, gaussians.quaternions, gaussians.intensities * scale)

    def render(self, gaussians: GaussianSet) -> torch.Tensor:
        """GaussianSet -> ``[B, 1, D, H, W]`` in fp32 (autocast off)."""
        cfg = self.config
        with fp32_autocast_off(gaussians.device.type):
            vol = render_volume(gaussians.to(torch.float32), cfg.img_size, cutoff=cfg.render_cutoff,
                                convention=cfg.render_convention, backend=cfg.render_backend)  # [B, D, H, W]
        return vol[:, None]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``loss="masked"`` (paper): MSE over the voxels of masked patches. ``loss="release"``:
        MSE between the render and ``imgs * mask_volume`` over the whole volume."""
        mask_vol = self.mask_volume(mask)  # [B, 1, D, H, W]
        if self.config.loss == "release":
            return ((pred.float() - imgs.float() * mask_vol) ** 2).mean()
        return self.masked_mean((pred.float() - imgs.float()) ** 2, mask_vol)

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None,
                generator: torch.Generator | None = None) -> ModelOutput:
        self.check_input(imgs)
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, generator)
        sets = self.forward_decoder(latent, ids_restore)
        if len(sets) > 1 and self.config.star_combine == "sum":
            union = GaussianSet.cat(sets)
            pred = self.render(union)
            return ModelOutput(self.forward_loss(imgs, pred, mask), pred, mask, union, sets)
        preds = [self.render(g) for g in sets]
        losses = [self.forward_loss(imgs, p, mask) for p in preds]
        loss = torch.stack(losses).mean()
        return ModelOutput(loss, preds[-1], mask, sets[-1], sets if len(sets) > 1 else None)

    @torch.no_grad()
    def predict_gaussians(self, volume: torch.Tensor, mask_ratio: float = 0.0, level: int | None = None,
                          generator: torch.Generator | None = None) -> GaussianSet:
        """Gaussians for ``volume [B, 1, D, H, W]`` (HU-windowed to [0, 1]), in eval mode and
        without gradients; the module's train/eval mode is restored afterwards.

        ``level`` (MedGMAE* only): 0, 1 or 2 picks one level; ``None`` gives the output set
        (finest level, or the union for ``star_combine="sum"``)."""
        was_training = self.training
        self.eval()
        try:
            self.check_input(volume)
            latent, _, ids_restore = self.forward_encoder(volume, mask_ratio, generator)
            sets = self.forward_decoder(latent, ids_restore)
        finally:
            self.train(was_training)
        if level is not None:
            if not 0 <= level < len(sets):
                raise ValueError(f"level must be in [0, {len(sets) - 1}] for objective {self.config.objective!r}, got {level}")
            return sets[level]
        if len(sets) > 1 and self.config.star_combine == "sum":
            return GaussianSet.cat(sets)
        return sets[-1]


class VoxelMAE(MaskedAutoencoder3D):
    """The voxel-MAE baseline: same encoder, MAE decoder regressing the voxels of each patch."""

    def __init__(self, config: ModelConfig):
        if config.objective != "voxel":
            raise ValueError(f"VoxelMAE needs objective 'voxel', got {config.objective!r}")
        super().__init__(config)
        self.decoder = VoxelDecoder(config)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """-> patch predictions ``[B, L, pd*ph*pw*C]``."""
        return self.decoder(latent, ids_restore)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Patch predictions ``[B, L, P]``: mean over masked patches of the per-patch MSE."""
        target = self.patchify(imgs)  # [B, L, P]
        per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # [B, L]
        return self.masked_mean(per_patch, mask)

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None,
                generator: torch.Generator | None = None) -> ModelOutput:
        self.check_input(imgs)
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, generator)
        pred_patches = self.forward_decoder(latent, ids_restore)  # [B, L, P]
        loss = self.forward_loss(imgs, pred_patches, mask)
        return ModelOutput(loss, self.unpatchify(pred_patches), mask, None, None)
