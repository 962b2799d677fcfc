"""Loading a pre-trained ViT encoder into :class:`~medgmae_core.seg.unetr.UNETR`.

Two checkpoint layouts are understood:

* ours (``medgmae-checkpoint/1``, any objective): ``model`` holds ``encoder.patch_embedding.*``,
  ``encoder.cls_token``, ``encoder.blocks.N.*`` (MONAI ``TransformerBlock`` names), ``encoder.norm.*``;
  ``model_config`` gives the encoder's sizes;
* the public release's (timm-style MAE): ``encoder.patch_embed.proj.*``, ``encoder.cls_token``,
  ``encoder.blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``encoder.norm.*`` and the
  position embedding ``encoder_pos_embed`` ``[1, L, dim]`` without a cls entry (a timm ``pos_embed``
  ``[1, 1 + L, dim]`` has its cls entry dropped), possibly wrapped in ``model`` / ``state_dict`` and
  prefixed with ``module.``.

Keys are mapped onto the UNETR's ``vit`` (our names), the position embedding is trilinearly
interpolated when the token grid differs, and :class:`LoadReport` lists what was loaded, missing,
unexpected and adapted. Missing or unexpected encoder weights and a patch-size or width mismatch raise.
"""
from __future__ import annotations

import argparse
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ..model.configs import ModelConfig, get_config
from ..train.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "medgmae-checkpoint/1"
POS_KEY = "patch_embedding.position_embeddings"
PATCH_KEY = "patch_embedding.patch_embeddings.weight"
# MONAI TransformerBlock creates this LayerNorm without using it; a release checkpoint cannot have it.
UNUSED_KEYS = re.compile(r"^blocks\.\d+\.norm_cross_attn\.(weight|bias)$")

# timm / release name -> our name (after the ``encoder.`` prefix is stripped)
_RELEASE_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(a), b) for a, b in (
    (r"^patch_embed\.proj\.", "patch_embedding.patch_embeddings."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"blocks.\1.attn.out_proj."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"blocks.\1.mlp.linear1."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"blocks.\1.mlp.linear2."),
))


@dataclass
class PretrainedEncoder:
    """Encoder weights in our names, with what is known about their architecture."""

    state: dict[str, torch.Tensor]
    source_format: str  # "medgmae" or "release"
    config: ModelConfig | None = None  # ours only
    ignored: list[str] = field(default_factory=list)  # non-encoder keys (decoders, heads, ...)
    origin: str = "checkpoint"

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.state[PATCH_KEY].shape[2:])  # type: ignore[return-value]

    @property
    def embed_dim(self) -> int:
        return int(self.state[PATCH_KEY].shape[0])

    @property
    def in_chans(self) -> int:
        return int(self.state[PATCH_KEY].shape[1])

    @property
    def depth(self) -> int:
        ids = {int(m.group(1)) for k in self.state if (m := re.match(r"^blocks\.(\d+)\.", k))}
        return max(ids) + 1 if ids else 0

    @property
    def grid_size(self) -> tuple[int, int, int]:
        if self.config is not None:
            return self.config.grid_size
        n = self.state[POS_KEY].shape[1]
        side = round(n ** (1.0 / 3.0))
        if side ** 3 != n:
            raise ValueError(f"{self.origin}: position embedding has {n} entries, not a cube; "
                             "cannot infer its token grid")
        return (side, side, side)

    def encoder_config(self, img_size: Any, *, num_heads: int | None = None) -> ModelConfig:
        """The encoder's config with the fine-tuning window ``img_size``."""
        if self.config is not None:
            cfg = self.config.replace(img_size=img_size)
            return cfg.replace(num_heads=num_heads) if num_heads else cfg
        dim = self.embed_dim
        mlp_ratio = self.state["blocks.0.mlp.linear1.weight"].shape[0] / dim if self.depth else 4.0
        if num_heads is None:
            presets = {get_config(n).embed_dim: get_config(n).num_heads for n in ("tiny", "base", "large")}
            if dim not in presets:
                raise ValueError(f"{self.origin}: cannot infer the number of attention heads for width {dim}; "
                                 "pass num_heads (--num-heads)")
            num_heads = presets[dim]
        return get_config("tiny").replace(img_size=img_size, patch_size=self.patch_size, in_chans=self.in_chans,
                                          embed_dim=dim, depth=self.depth, num_heads=num_heads,
                                          mlp_ratio=mlp_ratio, name="release")


@dataclass
class LoadReport:
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    unused_missing: list[str]
    adapted: list[str]
    ignored: int
    source_format: str
    origin: str

    def summary(self) -> str:
        lines = [f"encoder load report ({self.source_format} layout, {self.origin}):",
                 f"  loaded     {len(self.loaded)} tensors",
                 f"  missing    {len(self.missing)}" + (f": {', '.join(self.missing[:8])}" if self.missing else ""),
                 f"  unexpected {len(self.unexpected)}" + (f": {', '.join(self.unexpected[:8])}" if self.unexpected else ""),
                 f"  ignored    {self.ignored} non-encoder tensors (decoder, heads)"]
        if self.unused_missing:
            lines.append(f"  not in checkpoint but unused in the forward pass: {len(self.unused_missing)} "
                         "(MONAI norm_cross_attn)")
        lines += [f"  adapted    {a}" for a in self.adapted]
        return "\n".join(lines)


def _unwrap_state(raw: Any, origin: str) -> dict[str, torch.Tensor]:
    state = raw
    for key in ("model", "state_dict", "model_state_dict", "module"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{origin}: no model state dict found (looked for 'model', 'state_dict' or a bare dict)")
    return {re.sub(r"^module\.", "", str(k)): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _map_ours(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    out, ignored = {}, []
    for k, v in state.items():
        if k.startswith("encoder."):
            out[k[len("encoder."):]] = v
        elif k.startswith("vit."):  # a fine-tuned UNETR's encoder
            out[k[len("vit."):]] = v
        elif re.match(r"^(patch_embedding\.|blocks\.|norm\.|cls_token$)", k):
            out[k] = v  # a bare encoder state dict
        else:
            ignored.append(k)
    return out, ignored


def _map_release(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    out, ignored = {}, []
    for k, v in state.items():
        if k in ("encoder_pos_embed", "encoder.pos_embed", "pos_embed"):
            out[POS_KEY] = v
            continue
        if not k.startswith("encoder."):
            ignored.append(k)
            continue
        name = k[len("encoder."):]
        for pattern, repl in _RELEASE_RENAMES:
            name = pattern.sub(repl, name)
        out[name] = v
    pos = out.get(POS_KEY)
    if pos is not None:
        pos = pos.reshape(1, -1, pos.shape[-1])
        n = pos.shape[1]
        if round(n ** (1 / 3)) ** 3 != n and round((n - 1) ** (1 / 3)) ** 3 == n - 1:
            pos = pos[:, 1:]  # timm layout: drop the cls entry
        out[POS_KEY] = pos
    return out, ignored


def read_pretrained(source: str | Path | Mapping[str, Any]) -> PretrainedEncoder:
    """Encoder weights from a checkpoint file (or an already-loaded dict), in our parameter names."""
    origin = str(source) if isinstance(source, (str, Path)) else "checkpoint dict"
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"encoder checkpoint not found: {path}")
        try:
            # weights only (never runs code); MAE-style files may also hold their argparse Namespace
            with torch.serialization.safe_globals([argparse.Namespace]):
                raw = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path}: not a readable weights-only PyTorch checkpoint "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        if isinstance(raw, Mapping) and "format" in raw:
            raw = load_checkpoint(path)  # checks our format, clear errors
    else:
        raw = source
    config = None
    if isinstance(raw, Mapping) and raw.get("format") == CHECKPOINT_FORMAT:
        config = ModelConfig.from_dict(dict(raw["model_config"])) if raw.get("model_config") else None
    state = _unwrap_state(raw, origin)
    is_release = any(k.endswith("patch_embed.proj.weight") for k in state) or "encoder_pos_embed" in state
    mapped, ignored = (_map_release if is_release else _map_ours)(state)
    if PATCH_KEY not in mapped:
        raise ValueError(f"{origin}: no encoder patch embedding found (expected 'encoder.patch_embedding."
                         "patch_embeddings.weight' or the release's 'encoder.patch_embed.proj.weight'); "
                         "is this a pre-trained MedGMAE / MAE checkpoint?")
    if POS_KEY not in mapped:
        raise ValueError(f"{origin}: no encoder position embedding found")
    return PretrainedEncoder(mapped, "release" if is_release else "medgmae", config, ignored, origin)


def interpolate_pos_embed(pos: torch.Tensor, old_grid: tuple[int, int, int],
                          new_grid: tuple[int, int, int]) -> torch.Tensor:
    """``[1, L_old, dim]`` on ``old_grid`` -> ``[1, L_new, dim]`` on ``new_grid`` (trilinear)."""
    if math.prod(old_grid) != pos.shape[1]:
        raise ValueError(f"position embedding has {pos.shape[1]} entries, grid {old_grid} needs {math.prod(old_grid)}")
    if tuple(old_grid) == tuple(new_grid):
        return pos
    dim = pos.shape[-1]
    grid = pos.reshape(1, *old_grid, dim).permute(0, 4, 1, 2, 3).float()  # [1, dim, d, h, w]
    grid = F.interpolate(grid, size=tuple(new_grid), mode="trilinear", align_corners=False)
    return grid.permute(0, 2, 3, 4, 1).reshape(1, -1, dim).to(pos.dtype)  # [1, L_new, dim]


def load_encoder(unetr: torch.nn.Module, source: str | Path | Mapping[str, Any] | PretrainedEncoder, *,
                 verbose: bool = True) -> LoadReport:
    """Copy a pre-trained encoder into ``unetr.vit``; raise on missing/unexpected encoder weights."""
    pre = source if isinstance(source, PretrainedEncoder) else read_pretrained(source)
    target = unetr.vit.state_dict()
    t_patch = tuple(target[PATCH_KEY].shape[2:])
    if pre.patch_size != t_patch:
        raise ValueError(f"{pre.origin}: the encoder was pre-trained with patch size {pre.patch_size}, but the "
                         f"UNETR uses patch size {t_patch}; build the UNETR from this encoder's config "
                         "(its patch size cannot be changed after pre-training)")
    if pre.embed_dim != target[PATCH_KEY].shape[0] or pre.in_chans != target[PATCH_KEY].shape[1]:
        raise ValueError(f"{pre.origin}: encoder width {pre.embed_dim} / {pre.in_chans} input channel(s) differ "
                         f"from the UNETR's {target[PATCH_KEY].shape[0]} / {target[PATCH_KEY].shape[1]}")
    state = dict(pre.state)
    adapted = []
    new_grid = tuple(unetr.grid_size)
    old_grid = pre.grid_size
    if tuple(old_grid) != new_grid:
        state[POS_KEY] = interpolate_pos_embed(state[POS_KEY], old_grid, new_grid)
        adapted.append(f"position embedding interpolated from token grid {tuple(old_grid)} to {new_grid}")

    loaded, missing, unused, unexpected = [], [], [], []
    new_state = {}
    for k, v in target.items():
        if k not in state:
            (unused if UNUSED_KEYS.match(k) else missing).append(k)
        elif tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"{pre.origin}: encoder tensor {k} has shape {tuple(state[k].shape)}, "
                             f"the UNETR expects {tuple(v.shape)}")
        else:
            new_state[k] = state[k].to(v.dtype)
            loaded.append(k)
    unexpected = sorted(set(state) - set(target))
    report = LoadReport(loaded, missing, unexpected, unused, adapted, len(pre.ignored), pre.source_format,
                        pre.origin)
    if verbose:
        print(report.summary(), file=sys.stderr)
    if missing or unexpected:
        raise ValueError(f"{pre.origin}: encoder weights do not match the UNETR: {len(missing)} missing "
                         f"({', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}), {len(unexpected)} "
                         f"unexpected ({', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''})")
    unetr.vit.load_state_dict(new_state, strict=False)
    return report
