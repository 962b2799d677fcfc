"""UNETR over our pre-trained 3D ViT encoder, for any depth and any patch size.

MONAI's ``UNETR`` takes skip features from transformer layers 3, 6, 9 of 12 and upsamples by 2 four
times, i.e. it needs depth 12 and patch 16. Here the encoder is our :class:`ViTEncoder3D` (MONAI
``TransformerBlock``s, the same parameter names as ``model.encoder``), the three skips come from evenly
spaced layers (:func:`skip_layers`), and the decoder's four upsampling stages multiply to the patch size
(:func:`upsample_stages`: 16 -> 2,2,2,2 as in MONAI; 12 -> 1,3,2,2). The decoder reuses MONAI's
``UnetrBasicBlock``, ``UnetrUpBlock``, ``UnetResBlock`` and ``UnetOutBlock``; :class:`PrUpBlock` is
MONAI's ``UnetrPrUpBlock`` with a factor per stage.

As in pre-training the cls token is prepended to the patch tokens (it is dropped from the skips), so
the transformer sees the token layout it was trained on. A fine-tuned checkpoint is marked
``extra["task"] == SEG_TASK`` and carries :meth:`UNETR.architecture`, from which :func:`build_unetr` rebuilds it.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock, get_conv_layer
from torch import nn

from ..model.configs import ModelConfig
from ..model.vit import ViTEncoder3D

SEG_TASK = "segmentation"  # ``extra["task"]`` of a fine-tuned UNETR checkpoint (written by finetune, read by segment)


def skip_layers(depth: int, num_skips: int = 3) -> tuple[int, ...]:
    """0-based block indices whose outputs feed the skips: ``depth * k // 4`` (12 -> 3, 6, 9 as MONAI; 6 -> 1, 3, 4)."""
    if depth < 1:
        raise ValueError(f"encoder depth must be >= 1, got {depth}")
    return tuple(min(depth - 1, depth * k // (num_skips + 1)) for k in range(1, num_skips + 1))


def _stage_factors(p: int, stages: int = 4) -> list[int]:
    """``p`` as ``stages`` integer factors, deepest first: padded with 1s, then largest first (12 -> 1,3,2,2)."""
    primes, n, f = [], p, 2
    while n > 1:
        while n % f == 0:
            primes.append(f)
            n //= f
        f += 1
    while len(primes) > stages:
        primes.sort()
        primes = [primes[0] * primes[1]] + primes[2:]
    return [1] * (stages - len(primes)) + sorted(primes, reverse=True)


def upsample_stages(patch_size: Sequence[int]) -> list[tuple[int, int, int]]:
    """Per-stage (D, H, W) upsampling factors from the token grid to full resolution, deepest first."""
    per_axis = [_stage_factors(int(p)) for p in patch_size]
    return [tuple(axis[s] for axis in per_axis) for s in range(4)]  # type: ignore[misc]


class PrUpBlock(nn.Module):
    """Token features -> a skip map: a transposed conv per factor, conv blocks after all but the first
    (MONAI ``UnetrPrUpBlock`` with ``conv_block=True``, one factor per stage)."""

    def __init__(self, in_channels: int, out_channels: int, factors: Sequence[Sequence[int]], norm_name: Any,
                 res_block: bool = True) -> None:
        super().__init__()
        block = UnetResBlock if res_block else UnetBasicBlock
        self.transp_conv_init = get_conv_layer(3, in_channels, out_channels, kernel_size=factors[0],
                                               stride=factors[0], conv_only=True, is_transposed=True)
        self.blocks = nn.ModuleList([
            nn.Sequential(
                get_conv_layer(3, out_channels, out_channels, kernel_size=f, stride=f, conv_only=True,
                               is_transposed=True),
                block(3, out_channels, out_channels, kernel_size=3, stride=1, norm_name=norm_name),
            )
            for f in factors[1:]
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transp_conv_init(x)
        for blk in self.blocks:
            x = blk(x)
        return x


class UNETR(nn.Module):
    """UNETR whose ``vit`` is a :class:`ViTEncoder3D` built from ``encoder_config`` (its ``img_size`` is
    the fine-tuning window). ``forward(x[B, C, D, H, W]) -> logits[B, out_channels, D, H, W]``."""

    def __init__(self, encoder_config: ModelConfig, out_channels: int, *, feature_size: int = 16,
                 norm_name: Any = "instance", res_block: bool = True, skips: Sequence[int] | None = None,
                 use_cls_token: bool = True) -> None:
        super().__init__()
        if out_channels < 2:
            raise ValueError(f"out_channels must be >= 2 (background + classes), got {out_channels}")
        cfg = encoder_config
        self.encoder_config = cfg
        self.out_channels = int(out_channels)
        self.feature_size = int(feature_size)
        self.use_cls_token = use_cls_token
        self.vit = ViTEncoder3D(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.depth,
                                cfg.num_heads, cfg.mlp_ratio)
        self.skips = tuple(int(s) for s in (skips if skips is not None else skip_layers(cfg.depth)))
        if len(self.skips) != 3 or not all(0 <= s < cfg.depth for s in self.skips):
            raise ValueError(f"skips must be three block indices in [0, {cfg.depth}), got {self.skips}")
        self.grid_size = cfg.grid_size
        hidden, fs = cfg.embed_dim, feature_size
        f4, f3, f2, f1 = upsample_stages(cfg.patch_size)
        up = dict(kernel_size=3, norm_name=norm_name, res_block=res_block)
        self.encoder1 = UnetrBasicBlock(3, cfg.in_chans, fs, stride=1, **up)
        self.encoder2 = PrUpBlock(hidden, fs * 2, [f4, f3, f2], norm_name, res_block)
        self.encoder3 = PrUpBlock(hidden, fs * 4, [f4, f3], norm_name, res_block)
        self.encoder4 = PrUpBlock(hidden, fs * 8, [f4], norm_name, res_block)
        self.decoder5 = UnetrUpBlock(3, hidden, fs * 8, upsample_kernel_size=f4, **up)
        self.decoder4 = UnetrUpBlock(3, fs * 8, fs * 4, upsample_kernel_size=f3, **up)
        self.decoder3 = UnetrUpBlock(3, fs * 4, fs * 2, upsample_kernel_size=f2, **up)
        self.decoder2 = UnetrUpBlock(3, fs * 2, fs, upsample_kernel_size=f1, **up)
        self.out = UnetOutBlock(3, fs, out_channels)

    # ------------------------------------------------------------------ parts
    def architecture(self) -> dict[str, Any]:
        """What, besides the encoder config, rebuilds this network (stored in fine-tuned checkpoints)."""
        return {"out_channels": self.out_channels, "feature_size": self.feature_size,
                "skips": list(self.skips), "use_cls_token": self.use_cls_token}

    def freeze_encoder(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) the transformer; the fixed position embedding always stays frozen."""
        for name, p in self.vit.named_parameters():
            p.requires_grad_(not frozen and not name.endswith("position_embeddings")
                             and "norm_cross_attn" not in name)

    def encoder_layer_id(self, name: str) -> int:
        """Layer index for layer-wise lr decay: embeddings 0, block i -> i+1, everything else depth+1."""
        depth = self.encoder_config.depth
        if name.startswith("vit.patch_embedding") or name == "vit.cls_token":
            return 0
        if name.startswith("vit.blocks."):
            return int(name.split(".")[2]) + 1
        return depth + 1

    def proj_feat(self, x: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape  # [B, L, dim] -> [B, dim, d, h, w]
        return x.transpose(1, 2).reshape(b, dim, *self.grid_size)

    def forward_encoder(self, x_in: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x_in ``[B, C, D, H, W]`` -> (final tokens ``[B, L, dim]``, the three skip token maps)."""
        x = self.vit.patch_embedding(x_in)  # [B, L, dim]
        n_prefix = 0
        if self.use_cls_token:
            x = torch.cat([self.vit.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # [B, 1 + L, dim]
            n_prefix = 1
        hidden = []
        for i, block in enumerate(self.vit.blocks):
            x = block(x)
            if i in self.skips:
                hidden.append(x[:, n_prefix:])
        return self.vit.norm(x)[:, n_prefix:], hidden

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        x, (h1, h2, h3) = self.forward_encoder(x_in)
        enc1 = self.encoder1(x_in)
        enc2 = self.encoder2(self.proj_feat(h1))
        enc3 = self.encoder3(self.proj_feat(h2))
        enc4 = self.encoder4(self.proj_feat(h3))
        dec3 = self.decoder5(self.proj_feat(x), enc4)
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        out = self.decoder2(dec1, enc1)
        return self.out(out)  # [B, out_channels, D, H, W]


def build_unetr(encoder_config: ModelConfig | dict[str, Any], architecture: dict[str, Any]) -> UNETR:
    """Rebuild a fine-tuned UNETR from the encoder config and :meth:`UNETR.architecture`."""
    cfg = encoder_config if isinstance(encoder_config, ModelConfig) else ModelConfig.from_dict(encoder_config)
    arch = dict(architecture)
    return UNETR(cfg, int(arch.pop("out_channels")), **arch)
