"""Model configurations: one dataclass, three named sizes, one builder.

``get_config("tiny", img_size=48)`` -> :class:`ModelConfig`; ``build_model(config)`` -> ``nn.Module``.
A config round-trips through ``to_dict()`` / ``from_dict()`` (that dict is what checkpoints store).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

OBJECTIVES = ("gaussian", "gaussian_star", "voxel")
LOSSES = ("masked", "release")
STAR_COMBINES = ("levels", "sum")
RENDER_CONVENTIONS = ("paper", "release")
_AXES = ("D", "H", "W")


def _triple(value: Any, name: str) -> tuple[int, int, int]:
    """An int or a 3-sequence of ints -> ``(D, H, W)``; clear error naming ``name`` otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or three ints (D, H, W), got {value!r}")
    if isinstance(value, int):
        value = (value, value, value)
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or three ints (D, H, W), got {value!r}") from None
    if len(out) != 3 or any(v != orig for v, orig in zip(out, value)):
        raise ValueError(f"{name} must be an int or three ints (D, H, W), got {value!r}")
    if min(out) < 1:
        raise ValueError(f"{name} must be positive, got {out}")
    return out  # type: ignore[return-value]


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model. Sizes are ``(D, H, W)`` voxels.

    ``intensity_scale`` (default 0.1, the release's ``c``; the paper leaves ``c`` unstated)
    multiplies the intensity heads' output ``I_head`` in (0, 1). The Gaussians a model returns
    (``ModelOutput.gaussians``, ``predict_gaussians``) carry ``intensity_scale * I_head``, so
    ``render_volume(gaussians, img_size, cutoff=render_cutoff, convention=render_convention)``
    is exactly the model's prediction. With ``render_convention="release"`` (whose renderer
    already multiplies by 0.1) set it to 1.0 to reproduce the release. Why 0.1 and not 1:
    with the paper's initialisation (s ~ 0.2, I ~ 0.4) the k Gaussians overlap everywhere;
    measured on a 32^3 real-CT crop with k = 32, c = 1 renders a mean of 1.38 against a
    target of 0.45 (step-0 loss 8.2), c = 0.1 a mean of 0.14 (loss 0.18). Overfitting the tiny
    model (k = 64) on a 48^3 crop for 400 steps: c = 1 ends at masked MSE 0.0125 with its
    intensity sigmoids pushed to ~0.02, c = 0.1 at 0.0080 (the crop's variance is 0.023).

    MedGMAE* (``objective="gaussian_star"``), the ``star_*`` fields:

    * ``star_multipliers = (m1, m2)``: level 1 has ``m1*N0`` Gaussians, level 2 ``m2*N0``
      (``N0 = num_gaussians``): every base Gaussian has ``m1`` children in level 1 and every
      level-1 Gaussian ``m2 / m1`` children in level 2.
    * ``star_scale_step = 0.1`` and ``star_scale_shrink = (0.02, 0.05)``: the paper's
      ``s_l = s_parent + 0.1*tanh(.) - delta_s_l``; scales are clamped to ``star_min_scale``
      (0.005, half a voxel at 96^3).
    * ``star_sigma_centre = 0.05``: a child moves at most 0.05 per axis from its parent
      (about 5 voxels, 0.4 of a 12-voxel patch, at 96^3) -- it stays inside the parent's
      footprint (initial parent sigma 0.2; trained sigmas are patch-sized) so it refines
      rather than relocates.
    * ``star_sigma_intensity = 0.1`` (in head units, before ``intensity_scale``): +-0.1 of
      the [0, 1] HU window (about +-42 HU for [-175, 250]), the size of the soft-tissue
      contrasts a child has to add or remove.
    * ``star_sigma_rotation = 0.1``: each quaternion component moves by at most 0.1 before
      re-normalising, a reorientation of at most about 20 degrees: children fine-tune the
      parent's orientation and cannot flip it.
    * ``star_combine``: ``"levels"`` (default) -- every level is a complete representation of
      the volume (children *replace* their parents, as in 3DGS densification); each level is
      rendered and the loss is the mean of the per-level losses (deep supervision); ``pred``
      and ``gaussians`` are the finest level. ``"sum"`` -- all levels are rendered together
      as one set and the loss is taken on that sum; ``gaussians`` is the union.
    """

    img_size: tuple[int, int, int] = (96, 96, 96)
    patch_size: tuple[int, int, int] = (12, 12, 12)
    in_chans: int = 1
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 144
    decoder_depth: int = 2
    decoder_num_heads: int = 4
    num_gaussians: int = 64
    objective: str = "gaussian"
    mask_ratio: float = 0.75
    loss: str = "masked"
    render_convention: str = "paper"
    intensity_scale: float = 0.1
    render_cutoff: float | None = 3.0
    render_backend: str = "auto"
    star_multipliers: tuple[int, int] = (2, 4)
    star_scale_step: float = 0.1
    star_scale_shrink: tuple[float, float] = (0.02, 0.05)
    star_min_scale: float = 0.005
    star_sigma_centre: float = 0.05
    star_sigma_intensity: float = 0.1
    star_sigma_rotation: float = 0.1
    star_combine: str = "levels"
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        self.img_size = _triple(self.img_size, "img_size")
        self.patch_size = _triple(self.patch_size, "patch_size")
        self.star_multipliers = tuple(int(m) for m in self.star_multipliers)  # type: ignore[assignment]
        self.star_scale_shrink = tuple(float(s) for s in self.star_scale_shrink)  # type: ignore[assignment]
        self.validate()

    # ----------------------------------------------------------------- checks
    def validate(self) -> "ModelConfig":
        for axis, (n, p) in enumerate(zip(self.img_size, self.patch_size)):
            if n % p != 0:
                raise ValueError(
                    f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}: "
                    f"axis {axis} ({_AXES[axis]}) has {n} voxels, {n} % {p} = {n % p}")
        if self.in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {self.in_chans}")
        for prefix in ("", "decoder_"):
            dim, heads, depth = (getattr(self, f"{prefix}{n}") for n in ("embed_dim", "num_heads", "depth"))
            if depth < 1:
                raise ValueError(f"{prefix}depth must be >= 1, got {depth}")
            if heads < 1 or dim % heads != 0:
                raise ValueError(f"{prefix}embed_dim {dim} must be divisible by {prefix}num_heads {heads}")
            if dim % 6 != 0:
                raise ValueError(f"{prefix}embed_dim {dim} must be divisible by 6 "
                                 "(3D sine-cosine position embedding: dim/6 frequencies per axis)")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if self.num_gaussians < 1:
            raise ValueError(f"num_gaussians must be >= 1, got {self.num_gaussians}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.objective != "voxel" and self.in_chans != 1:
            raise ValueError(f"objective={self.objective!r} renders one intensity channel; in_chans must be 1, "
                             f"got {self.in_chans}")
        if self.objective == "voxel" and self.loss != "masked":
            raise ValueError("loss='release' applies to the Gaussian objectives only; "
                             "objective='voxel' uses the masked-patch MSE (loss='masked')")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.render_convention not in RENDER_CONVENTIONS:
            raise ValueError(f"render_convention must be one of {RENDER_CONVENTIONS}, got {self.render_convention!r}")
        if not self.intensity_scale > 0:
            raise ValueError(f"intensity_scale must be positive, got {self.intensity_scale}")
        if self.render_cutoff is not None and not self.render_cutoff > 0:
            raise ValueError(f"render_cutoff must be positive or None, got {self.render_cutoff}")
        m1, m2 = self.star_multipliers if len(self.star_multipliers) == 2 else (0, 0)
        if len(self.star_multipliers) != 2 or m1 < 1 or m2 < 1 or m2 % m1 != 0:
            raise ValueError(f"star_multipliers must be two positive ints (m1, m2) with m2 divisible by m1, "
                             f"got {self.star_multipliers}")
        if len(self.star_scale_shrink) != 2:
            raise ValueError(f"star_scale_shrink must be two floats (delta_s_1, delta_s_2), got {self.star_scale_shrink}")
        for name in ("star_scale_step", "star_min_scale", "star_sigma_centre", "star_sigma_intensity",
                     "star_sigma_rotation"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.star_combine not in STAR_COMBINES:
            raise ValueError(f"star_combine must be one of {STAR_COMBINES}, got {self.star_combine!r}")
        return self

    # ------------------------------------------------------------- properties
    @property
    def grid_size(self) -> tuple[int, int, int]:
        """Patches per axis."""
        return tuple(n // p for n, p in zip(self.img_size, self.patch_size))  # type: ignore[return-value]

    @property
    def num_patches(self) -> int:
        d, h, w = self.grid_size
        return d * h * w

    @property
    def is_gaussian(self) -> bool:
        return self.objective in ("gaussian", "gaussian_star")

    # ------------------------------------------------------------- conversion
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-safe dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        if not isinstance(data, dict):
            raise ValueError(f"model config must be a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def replace(self, **overrides: Any) -> "ModelConfig":
        return ModelConfig.from_dict({**self.to_dict(), **overrides})


# name -> the fields that differ from the defaults
_PRESETS: dict[str, dict[str, Any]] = {
    # Trains on a CPU. decoder_embed_dim 144 (not 128): the 3D sin-cos embedding needs dim % 6 == 0.
    "tiny": dict(embed_dim=192, depth=6, num_heads=3, decoder_embed_dim=144, decoder_depth=2,
                 decoder_num_heads=4, num_gaussians=64),
    # ViT-B sized encoder with a mid-size decoder.
    "base": dict(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=384, decoder_depth=4,
                 decoder_num_heads=12, num_gaussians=128),
    # The public release's model.
    "large": dict(embed_dim=1536, depth=12, num_heads=16, mlp_ratio=4.0, decoder_embed_dim=528,
                  decoder_depth=8, decoder_num_heads=16, num_gaussians=128),
}
CONFIG_NAMES = tuple(_PRESETS)


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """A named configuration (``tiny``, ``base``, ``large``) with field overrides, e.g.
    ``get_config("tiny", img_size=48, objective="voxel")``."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model config {name!r}; choose one of {CONFIG_NAMES}")
    return ModelConfig.from_dict({**_PRESETS[name], "name": name, **overrides})


def build_model(config: ModelConfig | dict[str, Any] | str):
    """The model for ``config`` (a ModelConfig, its dict, or a preset name): ``MedGMAE`` for
    the Gaussian objectives, ``VoxelMAE`` for ``objective="voxel"``."""
    from .medgmae import MedGMAE, VoxelMAE

    if isinstance(config, str):
        config = get_config(config)
    elif isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    elif not isinstance(config, ModelConfig):
        raise ValueError(f"config must be a ModelConfig, dict or preset name, got {type(config).__name__}")
    return MedGMAE(config) if config.is_gaussian else VoxelMAE(config)
