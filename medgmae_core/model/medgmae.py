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
from .configs import ModelConfig, get_config
from .gaussian_decoder import GaussianDecoder, anchor_axes_voxels, anchor_grid, anchor_patch_index
from .interpolation import interpolate_visible_on_grid
from .precision import fp32_autocast_off
from .residual_levels import build_residual_levels
from .vit import ViTEncoder3D
from .voxel_decoder import VoxelDecoder

NO_DECAY_TOKENS = ("cls_token", "query_tokens", "mask_token", "child_embed")

# How prediction hides patches (the decoder was only ever trained with mask_ratio of them hidden):
#   "none"    nothing hidden: all L tokens visible, which training never shows the decoder;
#   "single"  one random mask at the training ratio (the visible region is predicted too, unsupervised);
#   "average" n = 1 / (1 - ratio) complementary masks (each patch visible in exactly one pass), the union of
#             the n sets with intensity / n: renders the mean of the n predictions;
#   "hidden"  the same n passes; each Gaussian is taken from a pass in which its anchor's patch was hidden,
#             so every one of the k Gaussians is a prediction of unseen tissue (anchored layout only).
# The default was chosen by measuring full-window PSNR on held-out windows (README, "Inference masks").
MASK_POLICIES = ("none", "single", "average", "hidden")
DEFAULT_MASK_POLICY = "none"


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
                        generator: torch.Generator | None = None, noise: torch.Tensor | None = None):
        """imgs ``[B, C, D, H, W]`` -> (latent ``[B, 1 + L_keep, E]``, mask ``[B, L]``, ids_restore ``[B, L]``);
        ``noise [B, L]`` chooses the mask (lowest values kept) instead of ``generator``."""
        return self.encoder(imgs, self.resolve_mask_ratio(mask_ratio), generator, noise)

    def complementary_noise(self, batch: int, passes: int, generator: torch.Generator | None = None,
                            device: torch.device | str = "cpu") -> torch.Tensor:
        """``[passes, B, L]`` masking noise for ``passes`` complementary masks: one random permutation of the
        ``L`` patches per sample, cut into ``passes`` chunks; pass ``p`` keeps chunk ``p`` visible."""
        length = self.num_patches
        rank = torch.argsort(torch.rand(batch, length, generator=generator), dim=1)  # [B, L] a permutation
        chunk = length // passes
        noise = torch.stack([((rank - p * chunk) % length).float() for p in range(passes)])  # [P, B, L]
        return noise.to(device)

    # ----------------------------------------------------------- training
    def no_weight_decay(self) -> set[str]:
        """Names of parameters excluded from weight decay: norms, biases, tokens, position embeddings."""
        names = set()
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.ndim <= 1 or leaf in NO_DECAY_TOKENS or "pos_embed" in leaf or "position_embeddings" in leaf:
                names.add(name)
        return names

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

    def intensity_prior_input(self, imgs: torch.Tensor) -> torch.Tensor | None:
        """``[B, C, D, H, W]`` -> what the intensity prior needs: the mean of each patch ``[B, L]``, or for the
        interpolation prior the volume itself; None (nothing computed) for models without the prior."""
        if self.config.intensity_prior_radius <= 0:
            return None
        if self.config.intensity_prior_sigma > 0:
            return imgs.float()
        return self.patchify(imgs).float().mean(dim=-1)

    def interpolated_levels(self, imgs: torch.Tensor, ids_restore: torch.Tensor, num_visible: int) -> torch.Tensor:
        """The interpolation of the visible voxels of ``imgs [B, 1, D, H, W]`` at the anchors -> ``[B, k]``."""
        mask = torch.ones(ids_restore.shape, device=imgs.device)  # [B, L], 1 = hidden, in shuffled order
        mask[:, :num_visible] = 0
        mask = torch.gather(mask, 1, ids_restore)  # [B, L] in patch order
        sigma_vox = self.config.intensity_prior_sigma * sum(self.config.patch_size) / 3
        levels = interpolate_visible_on_grid(imgs.float(), self.mask_volume(mask) < 0.5, sigma_vox,
                                             anchor_axes_voxels(self.config))  # [B, g_D, g_H, g_W]
        return levels.reshape(levels.shape[0], -1)  # [B, k], the anchors' row-major order

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor,
                        patch_means: torch.Tensor | None = None) -> list[GaussianSet]:
        """-> Gaussian sets coarse to fine, in rendered units (see :meth:`to_volume_units`):
        ``[k]`` for MedGMAE, ``[N0, m1*N0, m2*N0]`` for MedGMAE*. ``patch_means [B, L]``: see
        :meth:`intensity_prior_input`."""
        if patch_means is not None and self.config.intensity_prior_sigma > 0:  # the volume: interpolation prior
            patch_means = self.interpolated_levels(patch_means, ids_restore, latent.shape[1] - 1)
        gaussians, features, context = self.decoder(latent, ids_restore, patch_means)  # head units
        sets = [gaussians]
        for level in self.levels:
            reference = sets[0] if self.config.star_relative_to == "base" else gaussians
            gaussians, features = level(reference, features, context)
            sets.append(gaussians)
        return [self.to_volume_units(g) for g in sets]

    def to_volume_units(self, gaussians: GaussianSet) -> GaussianSet:
        """Head-unit intensities (0, 1) -> rendered units: times ``c`` (``config.effective_intensity_scale``)."""
        scale = self.config.effective_intensity_scale
        return GaussianSet(gaussians.centres, gaussians.scales, gaussians.quaternions, gaussians.intensities * scale)

    def render(self, gaussians: GaussianSet) -> torch.Tensor:
        """GaussianSet -> ``[B, 1, D, H, W]`` in fp32 (autocast off)."""
        cfg = self.config
        with fp32_autocast_off(gaussians.device.type):
            vol = render_volume(gaussians.to(torch.float32), cfg.img_size, cutoff=cfg.render_cutoff,
                                convention=cfg.render_convention, backend=cfg.render_backend)  # [B, D, H, W]
        return vol[:, None]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``loss="masked"`` (paper): MSE over the voxels of masked patches, plus ``visible_loss_weight`` times
        the MSE over the visible voxels. ``loss="release"``: MSE between the render and ``imgs * mask_volume``
        over the whole volume."""
        mask_vol = self.mask_volume(mask)  # [B, 1, D, H, W]
        if self.config.loss == "release":
            return ((pred.float() - imgs.float() * mask_vol) ** 2).mean()
        squared = (pred.float() - imgs.float()) ** 2
        loss = self.masked_mean(squared, mask_vol)
        if self.config.visible_loss_weight > 0:
            loss = loss + self.config.visible_loss_weight * self.masked_mean(squared, 1 - mask_vol)
        return loss

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None,
                generator: torch.Generator | None = None) -> ModelOutput:
        self.check_input(imgs)
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, generator)
        sets = self.forward_decoder(latent, ids_restore, self.intensity_prior_input(imgs))
        if len(sets) > 1 and self.config.star_combine == "sum":
            union = GaussianSet.cat(sets)
            pred = self.render(union)
            return ModelOutput(self.forward_loss(imgs, pred, mask), pred, mask, union, sets)
        preds = [self.render(g) for g in sets]
        losses = [self.forward_loss(imgs, p, mask) for p in preds]
        loss = torch.stack(losses).mean()
        return ModelOutput(loss, preds[-1], mask, sets[-1], sets if len(sets) > 1 else None)

    @torch.no_grad()
    def predict_gaussians(self, volume: torch.Tensor, mask_policy: str | None = None, level: int | None = None,
                          generator: torch.Generator | None = None, mask_ratio: float | None = None) -> GaussianSet:
        """Gaussians for ``volume [B, 1, D, H, W]`` (HU-windowed to [0, 1]), in eval mode and without
        gradients; the module's train/eval mode is restored afterwards.

        ``mask_policy``: one of :data:`MASK_POLICIES` (default :data:`DEFAULT_MASK_POLICY`; ``"hidden"`` falls
        back to ``"average"`` for the free layout, which has no anchors). ``mask_ratio`` (the training ratio
        by default) sets the masks of ``"single"``, ``"average"`` and ``"hidden"``; masks are drawn from
        ``generator`` (seed 0 when None, so predictions repeat). ``mask_ratio=0`` alone means ``"none"``.
        ``level`` (MedGMAE* only): 0, 1 or 2 picks one level; ``None`` gives the output set (finest level,
        or the union for ``star_combine="sum"``)."""
        policy = self.resolve_mask_policy(mask_policy, mask_ratio)
        ratio = self.resolve_mask_ratio(mask_ratio)
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        was_training = self.training
        self.eval()
        try:
            self.check_input(volume)
            if policy == "none":
                return self._predict_once(volume, 0.0, level, generator, None)
            if policy == "single":
                return self._predict_once(volume, ratio, level, generator, None)
            passes = max(2, round(1.0 / (1.0 - ratio)))
            noise = self.complementary_noise(volume.shape[0], passes, generator, volume.device)  # [P, B, L]
            ratio = 1.0 - 1.0 / passes  # each pass keeps exactly one chunk visible
            outputs = [self._predict_once(volume, ratio, level, None, noise[p]) for p in range(passes)]
            if policy == "average":
                return GaussianSet.cat([GaussianSet(g.centres, g.scales, g.quaternions, g.intensities / passes)
                                       for g in outputs])
            return self._select_hidden(outputs, noise)
        finally:
            self.train(was_training)

    def resolve_mask_policy(self, mask_policy: str | None, mask_ratio: float | None = None) -> str:
        if mask_policy is None:
            mask_policy = "none" if mask_ratio is not None and float(mask_ratio) == 0.0 else DEFAULT_MASK_POLICY
        if mask_policy not in MASK_POLICIES:
            raise ValueError(f"mask_policy must be one of {MASK_POLICIES}, got {mask_policy!r}")
        if mask_policy == "hidden" and self.config.gaussian_layout != "anchored":
            mask_policy = "average"
        if mask_policy != "none" and mask_ratio is not None and float(mask_ratio) == 0.0:
            raise ValueError(f"mask_policy {mask_policy!r} hides patches; it needs mask_ratio > 0, got 0")
        return mask_policy

    def _predict_once(self, volume, ratio, level, generator, noise) -> GaussianSet:
        latent, _, ids_restore = self.forward_encoder(volume, ratio, generator, noise)
        sets = self.forward_decoder(latent, ids_restore, self.intensity_prior_input(volume))
        if level is not None:
            if not 0 <= level < len(sets):
                raise ValueError(f"level must be in [0, {len(sets) - 1}] for objective {self.config.objective!r}, got {level}")
            return sets[level]
        if len(sets) > 1 and self.config.star_combine == "sum":
            return GaussianSet.cat(sets)
        return sets[-1]

    def _select_hidden(self, outputs: list[GaussianSet], noise: torch.Tensor) -> GaussianSet:
        """Per Gaussian, the pass after the one in which its anchor's patch was visible (there it is hidden)."""
        passes = len(outputs)
        n_out = outputs[0].num_gaussians
        patch = anchor_patch_index(self.config, anchor_grid(self.config)).to(noise.device)  # [k]
        patch = patch.repeat_interleave(n_out // patch.numel())  # children share their base anchor's patch
        chunk = self.num_patches // passes
        visible_pass = (noise[0][:, patch] // chunk).long().clamp_max(passes - 1)  # [B, n_out]: pass 0's rank
        choose = (visible_pass + 1) % passes  # [B, n_out]
        stacked = [torch.stack([getattr(g, f) for g in outputs]) for f in ("centres", "scales", "quaternions")]
        pick = choose[None, ..., None]
        centres, scales, quats = (t.gather(0, pick.expand(1, *t.shape[1:]))[0] for t in stacked)
        inten = torch.stack([g.intensities for g in outputs]).gather(0, choose[None])[0]
        return GaussianSet(centres, scales, quats, inten)


def build_model(config: ModelConfig | dict | str) -> "MaskedAutoencoder3D":
    """The model for ``config`` (a ModelConfig, its dict, or a preset name): ``MedGMAE`` for
    the Gaussian objectives, ``VoxelMAE`` for ``objective="voxel"``."""
    if isinstance(config, str):
        config = get_config(config)
    elif isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    elif not isinstance(config, ModelConfig):
        raise ValueError(f"config must be a ModelConfig, dict or preset name, got {type(config).__name__}")
    return MedGMAE(config) if config.is_gaussian else VoxelMAE(config)


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
