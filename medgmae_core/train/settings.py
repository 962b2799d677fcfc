"""Pre-training settings: one typed table (``PretrainSettings``), its YAML files and their validation.

Precedence: the defaults here < ``--config run.yaml`` < command-line flags. The YAML is flat and uses the settings'
python names (``batch_size: 4`` for ``--batch-size 4``), plus an optional ``model_overrides:`` mapping of
:class:`~medgmae_core.model.ModelConfig` fields; examples ship in ``medgmae_core/configs/``. Checkpoints store the
resolved settings by these python names (``ckpt["train_config"]``), which is what ``--resume`` inherits.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..model import get_config

logger = logging.getLogger(__name__)

AMP_CHOICES = ("none", "auto", "bf16", "fp16")
CACHE_CHOICES = ("auto", "none", "memory", "disk")


def setting(default: Any, help_text: str, *, factory: bool = False) -> Any:
    """A settings field: its default (a copy per instance with ``factory``) and one line of help."""
    if factory:
        return field(default_factory=lambda: type(default)(default), metadata={"help": help_text})
    return field(default=default, metadata={"help": help_text})


@dataclass
class PretrainSettings:
    """Every setting of a pre-training run (python names; the flag is ``--name-with-dashes`` except ``out_dir``,
    which is ``--out``). Values are kept as validated (``validate_settings``), so ``to_dict()`` is exactly what a
    checkpoint's ``train_config`` holds."""

    # data
    data: list[str] | None = setting(None, "one or more of: a folder of NIfTI/NRRD/DICOM series, one volume, a MONAI "
                                           "datalist JSON, phantom[:N] (N generated phantoms, seeds 0..N-1, default 8);"
                                           " all are used together")
    datalist_key: str = setting("training", "key of the case list in a datalist JSON")
    spacing_mm: float = setting(1.5, "isotropic resampling spacing in mm")
    crops_per_case: int = setting(3, "random crops taken from each loaded case")
    pos: float = setting(3.0, "weight of foreground-centred crops (pos:neg)")
    neg: float = setting(1.0, "weight of crops centred anywhere (pos:neg)")
    cache: str = setting("auto", "preprocessed-volume cache: memory (MONAI CacheDataset), disk (PersistentDataset in "
                                 "--cache-dir), none; auto = disk if --cache-dir is given, else memory for phantoms or "
                                 "<= 16 volumes, else none")
    cache_dir: str | None = setting(None, "folder for the disk cache")
    phantom_shape: list[int] = setting([128, 128, 96], "phantom size X,Y,Z in voxels (with --data phantom)",
                                       factory=True)
    # model
    model: str = setting("tiny", "model size: tiny, base or large")
    objective: str = setting("gaussian", "proxy task: gaussian (MedGMAE), gaussian_star (MedGMAE*) or voxel (MAE "
                                         "baseline)")
    img_size: Any = setting(96, "crop / model input size: N or D,H,W")
    patch_size: Any = setting(None, "patch size: N or D,H,W (default: the model's, 12)")
    num_gaussians: int | None = setting(None, "Gaussian queries k (default: the model's)")
    mask_ratio: float = setting(0.75, "fraction of patches hidden from the encoder")
    loss: str = setting("masked", "masked (paper: MSE on masked voxels) or release (full-volume MSE against x*mask)")
    model_overrides: dict = setting({}, "YAML only: extra ModelConfig fields", factory=True)
    init_from: str | None = setting(None, "start from this pre-training checkpoint's weights (a new optimiser, "
                                          "schedule and step count; the model settings must build the same "
                                          "parameters)")
    # optimisation
    steps: int = setting(1000, "optimiser steps in total")
    batch_size: int = setting(2, "crops per step and process")
    lr: float = setting(0.0001, "peak learning rate (AdamW)")
    min_lr_ratio: float = setting(0.0, "final learning rate as a fraction of --lr")
    warmup_steps: int | None = setting(None, "linear warmup steps (default: 5%% of --steps)")
    weight_decay: float = setting(0.05, "AdamW weight decay (not on norms, biases, tokens)")
    clip_grad: float = setting(1.0, "gradient norm clip (0: off)")
    seed: int = setting(0, "random seed (model init, data order, crops, masks)")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    amp: str = setting("none", "mixed precision: none, auto (bf16 on CPU, bf16/fp16 on CUDA), bf16, fp16 (CUDA); the "
                               "renderer always runs in fp32")
    num_workers: int = setting(0, "data-loading worker processes")
    # output
    out_dir: str = setting("runs/pretrain", "folder for checkpoints, loss_curve.png and config.yaml")
    checkpoint_every: int = setting(100, "write a checkpoint every N steps (and at the end)")
    keep_last: int = setting(3, "step checkpoints to keep besides last.pt (0: all)")
    log_every: int = setting(1, "report progress every N steps")
    resume: str | None = setting(None, "checkpoint to continue from, or 'auto' (OUT/last.pt if it exists)")
    progress_json: bool = setting(False, "print JSON progress lines on stdout (for programs, e.g. the Slicer panel)")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PretrainSettings":
        unknown = sorted(set(values) - set(SETTINGS))
        if unknown:
            raise ValueError(f"unknown settings {unknown}; known: {sorted(SETTINGS)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> "PretrainSettings":
        return dataclasses.replace(self, **changes)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


# Every setting: its default and one line of help (derived from PretrainSettings, the one table).
SETTINGS: dict[str, tuple[Any, str]] = {f.name: (_default(f), f.metadata["help"])
                                        for f in dataclasses.fields(PretrainSettings)}
# Settings that define what a run computes: changing them on --resume breaks exact continuation.
RUN_DEFINING = ("init_from", "data", "datalist_key", "spacing_mm", "crops_per_case", "pos", "neg", "phantom_shape", "seed",
                "batch_size", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "clip_grad", "amp")
GAUSSIAN_PRIOR_KEYS = ("intensity_prior_radius", "intensity_prior_sigma")  # ModelConfig: Gaussian objectives only
MODEL_KEYS = ("model", "objective", "img_size", "patch_size", "num_gaussians", "mask_ratio", "loss", "model_overrides")
# Settings of one session, never inherited from the checkpoint on --resume.
SESSION_KEYS = ("resume", "progress_json", "device", "num_workers", "out_dir", "cache", "cache_dir")




CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # the shipped example YAMLs


def shipped_configs() -> list[str]:
    """Names of the example YAMLs in ``medgmae_core/configs`` (usable as ``--config NAME``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name: str | Path) -> Path:
    """A YAML path, or the name of a shipped example (``phantom`` or ``pretrain_phantom``)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    stem = path.name.removesuffix(".yaml")
    for candidate in (CONFIG_DIR / f"{stem}.yaml", CONFIG_DIR / f"pretrain_{stem}.yaml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"config file not found: {path} (shipped examples: {', '.join(shipped_configs())})")


def read_settings_yaml(path: str | Path, known: Any) -> dict[str, Any]:
    """A flat YAML mapping of settings (the one settings-file reader: ``pretrain`` and ``finetune``): ``-`` in keys
    read as ``_``, names outside ``known`` refused, ``null`` values count as not given."""
    path = Path(path)
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML ({exc})") from exc
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(content).__name__}")
    content = {str(k).replace("-", "_"): v for k, v in content.items()}
    unknown = sorted(set(content) - set(known))
    if unknown:
        raise ValueError(f"{path}: unknown settings {unknown}; known: {sorted(known)}")
    return {k: v for k, v in content.items() if v is not None}


# ModelConfig fields that top-level settings own (build_model_config sets them from the settings).
_SETTINGS_OWNED_MODEL_FIELDS = ("name", "img_size", "patch_size", "num_gaussians", "objective", "mask_ratio", "loss")


def load_settings_yaml(path: str | Path) -> dict[str, Any]:
    """Pre-training settings from a YAML file or a shipped example's name; ``null`` values count as not given.

    A run's own ``config.yaml`` also records its resolved ``model_config``; read back, that section becomes
    ``model_overrides`` (explicit ``model_overrides`` win), so ``--config RUN/config.yaml`` rebuilds the same model.
    """
    path = resolve_config_path(path)
    content = read_settings_yaml(path, [*SETTINGS, "model_config"])
    for key in ("model_overrides", "model_config"):
        if not isinstance(content.get(key) or {}, dict):
            raise ValueError(f"{path}: {key} must be a mapping of ModelConfig fields")
    recorded = content.pop("model_config", None) or {}
    if recorded:
        recorded = {k: v for k, v in recorded.items() if k not in _SETTINGS_OWNED_MODEL_FIELDS}
        content["model_overrides"] = {**recorded, **(content.get("model_overrides") or {})}
    return content


def _size(value: Any, name: str) -> list[int] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, int) else list(value)
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or any(not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name} must be N or three positive ints D,H,W, got {value!r}")
    return values


def validate_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """Normalise and check a merged settings dict; errors name the setting."""
    cfg = dict(cfg)
    if not cfg.get("data"):
        raise ValueError("no training data: pass --data FOLDER|FILE|DATALIST.json|phantom[:N] (or 'data:' in the YAML)")
    data = cfg["data"] if isinstance(cfg["data"], (list, tuple)) else [cfg["data"]]
    cfg["data"] = [str(d) for d in data]
    cfg["img_size"] = _size(cfg["img_size"], "img_size")
    cfg["patch_size"] = _size(cfg["patch_size"], "patch_size")
    cfg["phantom_shape"] = _size(cfg["phantom_shape"], "phantom_shape")
    for name in ("steps", "batch_size", "crops_per_case", "checkpoint_every", "log_every"):
        if int(cfg[name]) < 1:
            raise ValueError(f"{name} must be >= 1, got {cfg[name]}")
        cfg[name] = int(cfg[name])
    for name in ("num_workers", "keep_last"):
        if int(cfg[name]) < 0:
            raise ValueError(f"{name} must be >= 0, got {cfg[name]}")
        cfg[name] = int(cfg[name])
    if cfg["warmup_steps"] is None:
        cfg["warmup_steps"] = max(1, round(0.05 * cfg["steps"]))
    if int(cfg["warmup_steps"]) < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {cfg['warmup_steps']}")
    if not float(cfg["spacing_mm"]) > 0:
        raise ValueError(f"spacing_mm must be positive, got {cfg['spacing_mm']}")
    if cfg["amp"] not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {AMP_CHOICES}, got {cfg['amp']!r}")
    if cfg["cache"] not in CACHE_CHOICES:
        raise ValueError(f"cache must be one of {CACHE_CHOICES}, got {cfg['cache']!r}")
    if float(cfg["pos"]) < 0 or float(cfg["neg"]) < 0 or float(cfg["pos"]) + float(cfg["neg"]) <= 0:
        raise ValueError(f"pos and neg must be >= 0 and not both 0, got {cfg['pos']}:{cfg['neg']}")
    return cfg


def build_model_config(cfg: dict[str, Any] | PretrainSettings):
    """The run's ``ModelConfig`` from its settings."""
    if isinstance(cfg, PretrainSettings):
        cfg = cfg.to_dict()
    overrides = dict(cfg.get("model_overrides") or {})
    if cfg["objective"] == "voxel":  # a Gaussian preset run with --objective voxel: its matched voxel-MAE control
        dropped = sorted(k for k in GAUSSIAN_PRIOR_KEYS if overrides.pop(k, None) is not None)
        if dropped:
            logger.warning("objective voxel: ignoring the Gaussian-only settings %s", ", ".join(dropped))
    overrides.update(img_size=tuple(cfg["img_size"]), objective=cfg["objective"], mask_ratio=float(cfg["mask_ratio"]),
                     loss=cfg["loss"])
    if cfg.get("patch_size"):
        overrides["patch_size"] = tuple(cfg["patch_size"])
    if cfg.get("num_gaussians"):
        overrides["num_gaussians"] = int(cfg["num_gaussians"])
    return get_config(cfg["model"], **overrides)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        amp = "bf16" if device.type == "cpu" or torch.cuda.is_bf16_supported() else "fp16"
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device; use --amp bf16 on CPU")
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
