"""Model configurations: one dataclass and three named sizes.

``get_config("tiny", img_size=48)`` -> :class:`ModelConfig`; ``model.build_model(config)`` -> ``nn.Module``.
A config round-trips through ``to_dict()`` / ``from_dict()`` (that dict is what checkpoints store).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

OBJECTIVES = ("gaussian", "gaussian_star", "voxel")
LOSSES = ("masked", "release")
STAR_COMBINES = ("levels", "sum")
STAR_RELATIVE = ("base", "parent")
GAUSSIAN_LAYOUTS = ("anchored", "free")
RENDER_CONVENTIONS = ("paper", "release")
_AXES = ("D", "H", "W")
GAUSSIAN_INTEGRAL = (2 * math.pi) ** 1.5  # integral of exp(-|x|^2 / 2) over R^3


def anchor_grid_shape(k: int) -> tuple[int, int, int]:
    """The most cubic ``(g_D, g_H, g_W)`` with ``g_D * g_H * g_W = k`` (512 -> 8, 8, 8; 1024 -> 8, 8, 16)."""
    best = (1, 1, k)
    for a in range(1, round(k ** (1 / 3)) + 2):
        if k % a:
            continue
        for b in range(a, int(math.isqrt(k // a)) + 1):
            if (k // a) % b == 0:
                c = k // a // b
                if max(a, b, c) / min(a, b, c) < max(best) / min(best):
                    best = (a, b, c)
    return best


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

    **Gaussian layout** (``gaussian_layout``):

    * ``"anchored"`` (default): query ``j`` owns an anchor ``a_j``, the centre of cell ``j`` of a
      ``g_D x g_H x g_W = k`` grid over the window (:func:`anchor_grid`; ``k = 512`` gives the 8^3 grid of
      the 12^3 patches). Its token is a learnable embedding plus the sine-cosine embedding of ``a_j``, its
      centre is ``a_j + anchor_offset_ratio * h * tanh(.)`` and its scale
      ``h * (min_scale_ratio + (max_scale_ratio - min_scale_ratio) * sigmoid(.))`` per axis, with ``h`` the
      anchor spacing ``1 / g`` (normalised units). Queries therefore start spread over the window and a
      Gaussian can never grow past ``max_scale_ratio`` cells.
    * ``"free"``: the paper's and the release's free queries (init std 0.02, centre sigmoid over the whole
      window, scale sigmoid in (0, 1)). Kept to load and compare such checkpoints: with k = 512 its
      near-identical queries start every Gaussian near one centre (issue 10 measures the collapse).

    **Local context** (``decoder_context_radius``, patch units; 0 = off, the paper's decoder): every token the
    decoder must fill (a Gaussian query at its anchor; a voxel-MAE mask token at its patch) starts from the
    Gaussian-weighted mean of the visible tokens around it (:func:`~medgmae_core.model.vit.local_context`,
    through a learnt projection). Measured on held-out windows, a tiny model without it stays at the constant
    baseline for thousands of CPU steps while a fixed interpolation of the visible voxels is 3-4 dB better;
    both objectives get it, so the Gaussian / voxel comparison stays fair.

    **Intensity prior** (``intensity_prior_radius``, patch units; 0 = off, the default, so older checkpoints
    load as they were trained; anchored only): the intensity head predicts a correction to the local level of
    the visible voxels. Query ``j``'s intensity is ``sigmoid(head(.) + bias + logit(b_j / peak_value))``, where
    ``b_j`` is the mean intensity of the visible patches around its anchor, weighted by
    ``softmax(-d^2 / (2 r^2))`` as in the local context. An untrained model therefore renders an interpolation
    of what it sees instead of a flat ``target_mean``; the decoder learns what the interpolation misses.
    The untrained prior is best at ``r = 0.5`` (nearly the nearest visible patches; masked gain over the constant
    on held-out real CT +2.9 / +2.7 / +2.4 / +1.9 dB at r = 0.5 / 0.7 / 1 / 1.4), but trained for 2,500 steps
    both ``r = 0.5`` and ``r = 1`` reach about +3.5 dB and ``r = 0.5`` grows the median largest sigma past 8
    voxels (8.8 against 7.7), so the CPU recipe (``pretrain_tiny_cpu.yaml``) uses ``r = 1``.

    **Interpolation prior** (``intensity_prior_sigma``, patch units; 0 = off: the patch-mean prior above): ``b_j``
    is instead the interpolation of the visible voxels (normalised convolution with a Gaussian of
    ``intensity_prior_sigma`` patches, :func:`~medgmae_core.model.interpolation.interpolate_visible`) at anchor
    ``j``. It needs ``intensity_prior_radius > 0`` (the prior on); the radius is then unused.

    **Visible loss** (``visible_loss_weight`` w; 0 = off, the paper's loss): the Gaussian loss becomes
    ``MSE(masked voxels) + w * MSE(visible voxels)``, so the render must also reproduce what the encoder saw.

    **Scale coupling.** The initial render's mean over the window is
    ``k * c * I0 * (2 pi)^(3/2) * s0_D * s0_H * s0_W`` (each Gaussian's integral, all mass inside). The
    initial scale is ``s0 = init_scale_ratio * h`` per axis (for ``"free"``: ``init_scale_ratio * k^(-1/3)``),
    so ``k * s0^3 = init_scale_ratio^3`` does not depend on ``k``, and the intensity scale and the initial
    intensity follow::

        c  = peak_value / ((2 pi)^(3/2) * init_scale_ratio^3)     # I = 1 everywhere renders ~peak_value
        I0 = target_mean / peak_value                             # initial render mean = target_mean

    ``target_mean`` (0.3) is the typical mean of 96^3 training crops windowed to [0, 1] (measured 0.28-0.36 on
    the phantoms and the TotalSegmentator CTs); ``peak_value`` (1.2) leaves room above the window's top.
    ``intensity_scale`` set explicitly overrides the derived ``c`` (the release's 0.1 with ``"free"``).
    For MedGMAE* every level is a complete set, and level ``l`` with ``n_l = m_l * N0`` Gaussians starts
    ``m_l^(1/3)`` times smaller (``star_scale_shrink`` derived), so each level's initial mean is the same.

    MedGMAE* (``objective="gaussian_star"``), the ``star_*`` fields, as in the paper's Eq. 4 every level
    is relative to level 0 (``star_relative_to="base"``):

    * ``star_multipliers = (m1, m2)``: level 1 has ``m1*N0`` Gaussians, level 2 ``m2*N0``; child ``i`` of a
      level belongs to base Gaussian ``i // m_l``.
    * scale: ``s_l = s_0 + star_scale_step * tanh(.) - delta_s_l``, clamped to ``star_min_scale``; with
      ``star_scale_shrink=None`` (default) ``delta_s_l = s0 * (1 - m_l^(-1/3))`` (the paper's fixed
      0.02 / 0.05 were chosen for s0 = 0.2); ``star_scale_step`` defaults to ``0.5 * s0`` (``None``).
    * centre: ``mu_l = mu_0 + star_sigma_centre * tanh(.)``; default ``None`` = half an anchor cell
      (``0.5 * k^(-1/3)``), so the children of one base Gaussian tile its cell.
    * ``star_sigma_intensity = 0.1`` (in head units, before ``c``) and ``star_sigma_rotation = 0.1``
      (a reorientation of at most about 20 degrees).
    * ``star_relative_to="parent"`` chains each level to the one above instead (a variant, not the paper's).
    * ``star_combine``: ``"levels"`` (default): every level is a complete representation, each level is
      rendered and the loss is the mean of the per-level losses; ``pred`` and ``gaussians`` are the finest
      level. ``"sum"``: all levels rendered together as one set.
    """

    img_size: tuple[int, int, int] = (96, 96, 96)
    patch_size: tuple[int, int, int] = (12, 12, 12)
    in_chans: int = 1
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 144
    decoder_depth: int = 4
    decoder_num_heads: int = 4
    num_gaussians: int = 512
    objective: str = "gaussian"
    mask_ratio: float = 0.75
    loss: str = "masked"
    visible_loss_weight: float = 0.0
    gaussian_layout: str = "anchored"
    decoder_context_radius: float = 1.0
    intensity_prior_radius: float = 0.0
    intensity_prior_sigma: float = 0.0
    init_scale_ratio: float = 0.5
    min_scale_ratio: float = 0.04
    max_scale_ratio: float = 1.0
    anchor_offset_ratio: float = 1.0
    target_mean: float = 0.3
    peak_value: float = 1.2
    intensity_scale: float | None = None
    render_convention: str = "paper"
    render_cutoff: float | None = 3.0
    render_backend: str = "auto"
    star_multipliers: tuple[int, int] = (2, 4)
    star_scale_step: float | None = None
    star_scale_shrink: tuple[float, float] | None = None
    star_min_scale: float = 0.005
    star_sigma_centre: float | None = None
    star_sigma_intensity: float = 0.1
    star_sigma_rotation: float = 0.1
    star_relative_to: str = "base"
    star_combine: str = "levels"
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        self.img_size = _triple(self.img_size, "img_size")
        self.patch_size = _triple(self.patch_size, "patch_size")
        self.star_multipliers = tuple(int(m) for m in self.star_multipliers)  # type: ignore[assignment]
        if self.star_scale_shrink is not None:
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
        if self.visible_loss_weight < 0:
            raise ValueError(f"visible_loss_weight must be >= 0 (0: off), got {self.visible_loss_weight}")
        if self.visible_loss_weight > 0 and (self.loss != "masked" or not self.is_gaussian):
            raise ValueError("visible_loss_weight adds to the masked loss of the Gaussian objectives "
                             f"(got objective {self.objective!r}, loss {self.loss!r})")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.render_convention not in RENDER_CONVENTIONS:
            raise ValueError(f"render_convention must be one of {RENDER_CONVENTIONS}, got {self.render_convention!r}")
        if self.gaussian_layout not in GAUSSIAN_LAYOUTS:
            raise ValueError(f"gaussian_layout must be one of {GAUSSIAN_LAYOUTS}, got {self.gaussian_layout!r}")
        if self.gaussian_layout == "anchored" and not 0 < self.min_scale_ratio < self.init_scale_ratio < self.max_scale_ratio:
            raise ValueError("scale ratios must satisfy 0 < min_scale_ratio < init_scale_ratio < max_scale_ratio, got "
                             f"{self.min_scale_ratio}, {self.init_scale_ratio}, {self.max_scale_ratio}")
        if self.gaussian_layout == "free" and not 0 < self.init_scale_ratio * self.num_gaussians ** (-1 / 3) < 1:
            raise ValueError(f"init_scale_ratio {self.init_scale_ratio} gives an initial scale >= 1 for "
                             f"num_gaussians {self.num_gaussians} (free layout: scales lie in (0, 1))")
        if self.decoder_context_radius < 0:
            raise ValueError(f"decoder_context_radius must be >= 0 (0: off), got {self.decoder_context_radius}")
        if self.intensity_prior_radius < 0:
            raise ValueError(f"intensity_prior_radius must be >= 0 (0: off), got {self.intensity_prior_radius}")
        if self.intensity_prior_radius > 0 and (self.gaussian_layout != "anchored" or not self.is_gaussian):
            raise ValueError("intensity_prior_radius needs the Gaussian objectives with gaussian_layout='anchored' "
                             f"(got objective {self.objective!r}, layout {self.gaussian_layout!r})")
        if self.intensity_prior_sigma < 0:
            raise ValueError("intensity_prior_sigma must be >= 0 (0: the patch-mean prior), "
                             f"got {self.intensity_prior_sigma}")
        if self.intensity_prior_sigma > 0 and self.intensity_prior_radius <= 0:
            raise ValueError("intensity_prior_sigma picks the interpolation prior; it needs the prior on "
                             "(intensity_prior_radius > 0)")
        for name in ("anchor_offset_ratio", "target_mean", "peak_value"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.target_mean < self.peak_value:
            raise ValueError(f"target_mean ({self.target_mean}) must be below peak_value ({self.peak_value})")
        if self.intensity_scale is not None and not self.intensity_scale > 0:
            raise ValueError(f"intensity_scale must be positive or None (derived from k), got {self.intensity_scale}")
        if self.render_cutoff is not None and not self.render_cutoff > 0:
            raise ValueError(f"render_cutoff must be positive or None, got {self.render_cutoff}")
        m1, m2 = self.star_multipliers if len(self.star_multipliers) == 2 else (0, 0)
        if len(self.star_multipliers) != 2 or m1 < 1 or m2 < 1 or m2 % m1 != 0:
            raise ValueError(f"star_multipliers must be two positive ints (m1, m2) with m2 divisible by m1, "
                             f"got {self.star_multipliers}")
        if self.star_scale_shrink is not None and len(self.star_scale_shrink) != 2:
            raise ValueError(f"star_scale_shrink must be two floats (delta_s_1, delta_s_2) or None, "
                             f"got {self.star_scale_shrink}")
        for name in ("star_scale_step", "star_min_scale", "star_sigma_centre", "star_sigma_intensity",
                     "star_sigma_rotation"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.star_relative_to not in STAR_RELATIVE:
            raise ValueError(f"star_relative_to must be one of {STAR_RELATIVE}, got {self.star_relative_to!r}")
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

    @property
    def anchor_grid_shape(self) -> tuple[int, int, int]:
        """The ``g_D x g_H x g_W = k`` anchor grid (see :func:`anchor_grid_shape`)."""
        return anchor_grid_shape(self.num_gaussians)

    @property
    def initial_scale(self) -> tuple[float, float, float]:
        """``s0`` per axis in normalised units (class docstring, scale coupling)."""
        if self.gaussian_layout == "free":
            return (self.init_scale_ratio * self.num_gaussians ** (-1 / 3),) * 3  # type: ignore[return-value]
        return tuple(self.init_scale_ratio * h for h in self.anchor_spacing)  # type: ignore[return-value]

    @property
    def anchor_spacing(self) -> tuple[float, float, float]:
        """``h`` per axis: the anchor cells' side in normalised units (voxel ``i`` at ``i / (N - 1)``)."""
        return tuple(n / (g * (n - 1)) for n, g in zip(self.img_size, self.anchor_grid_shape))  # type: ignore

    @property
    def initial_intensity(self) -> float:
        """``I0`` in head units (0, 1): the initial render's mean is ``target_mean``."""
        return self.target_mean / self.peak_value if self.intensity_scale is None else min(
            0.99, self.target_mean / (self.intensity_scale * GAUSSIAN_INTEGRAL * self.init_scale_ratio ** 3))

    @property
    def effective_intensity_scale(self) -> float:
        """``c``: ``intensity_scale``, or derived from ``peak_value`` and ``init_scale_ratio``."""
        if self.intensity_scale is not None:
            return float(self.intensity_scale)
        return self.peak_value / (GAUSSIAN_INTEGRAL * self.init_scale_ratio ** 3)

    @property
    def star_level_shrinks(self) -> tuple[float, float]:
        """``delta_s`` of levels 1 and 2 (derived from the multipliers unless given)."""
        if self.star_scale_shrink is not None:
            return self.star_scale_shrink  # type: ignore[return-value]
        s0 = min(self.initial_scale)
        return tuple(s0 * (1 - m ** (-1 / 3)) for m in self.star_multipliers)  # type: ignore[return-value]

    @property
    def star_scale_range(self) -> float:
        return self.star_scale_step if self.star_scale_step is not None else 0.5 * min(self.initial_scale)

    @property
    def star_centre_range(self) -> float:
        return self.star_sigma_centre if self.star_sigma_centre is not None else 0.5 * self.num_gaussians ** (-1 / 3)

    # ------------------------------------------------------------- conversion
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-safe dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        if not isinstance(data, dict):
            raise ValueError(f"model config must be a dict, got {type(data).__name__}")
        if "intensity_scale" in data and "gaussian_layout" not in data:
            # a checkpoint written before the anchored layout existed: free queries, its own c and shrinks
            data = {"gaussian_layout": "free", "init_scale_ratio": 0.8, "star_relative_to": "parent",
                    "decoder_context_radius": 0.0, **data}
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
    "tiny": dict(embed_dim=192, depth=6, num_heads=3, decoder_embed_dim=144, decoder_depth=4,
                 decoder_num_heads=4, num_gaussians=512),
    # ViT-B sized encoder with a mid-size decoder.
    "base": dict(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=384, decoder_depth=4,
                 decoder_num_heads=12, num_gaussians=512),
    # The paper's model (Table 9): the release's encoder and decoder widths, k = 512.
    "large": dict(embed_dim=1536, depth=12, num_heads=16, mlp_ratio=4.0, decoder_embed_dim=528,
                  decoder_depth=8, decoder_num_heads=16, num_gaussians=512),
}
CONFIG_NAMES = tuple(_PRESETS)


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """A named configuration (``tiny``, ``base``, ``large``) with field overrides, e.g.
    ``get_config("tiny", img_size=48, objective="voxel")``."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model config {name!r}; choose one of {CONFIG_NAMES}")
    return ModelConfig.from_dict({**_PRESETS[name], "name": name, **overrides})
