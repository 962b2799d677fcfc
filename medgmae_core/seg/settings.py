"""Fine-tuning settings: ``FinetuneSettings``, the one typed table of a ``seg.finetune.run``.

Field names are the python names of ``medgmae finetune``'s flags (``commands.options``); the command layer
(``commands.finetune.settings_from_args``) merges defaults < ``--config`` YAML < flags into one of these, so
no library function sees an ``argparse.Namespace``. ``check()`` rejects impossible values naming the flag;
``to_dict()`` is the checkpoint's ``train_config``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence


@dataclass
class FinetuneSettings:
    """Every setting of a fine-tuning run (python names of ``medgmae finetune``'s flags; ``commands.options``)."""

    out: str = ""                      # run folder: step_*.pt, last.pt, best.pt, curves.png, history.json
    # data
    data: str | None = None            # datalist JSON or phantom[:N]
    cases: list = field(default_factory=list)   # [(image, label), ...] instead of ``data``
    label_map: str | None = None
    classes: str | None = None
    label_fraction: float = 1.0
    val_fraction: float = 0.2
    spacing_mm: float | None = 1.5     # <= 0 or None: keep the input spacing
    img_size: Any = 96                 # crop / sliding-window size: N or (D, H, W)
    crops_per_case: int = 2
    pos: float = 3.0
    neg: float = 1.0
    phantom_shape: Any = (96, 96, 64)
    phantom_spacing: float = 3.0
    # model
    encoder: str | None = None         # pre-trained checkpoint; None: train from scratch
    model: str = "tiny"                # encoder size when training from scratch
    patch_size: int | None = None
    num_heads: int | None = None
    feature_size: int = 16
    freeze_encoder: bool = False
    # optimisation
    steps: int = 1000
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 1e-5
    layer_decay: float = 0.75
    warmup_steps: int = 50
    clip_grad: float = 1.0
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    # output
    val_every: int = 100
    checkpoint_every: int = 200
    keep_last: int = 2
    resume: str | None = None          # "auto" (OUT/last.pt) or a checkpoint path
    progress_json: bool = False
    quiet: bool = False

    def check(self) -> "FinetuneSettings":
        """Errors name the flag; returns ``self``."""
        if not self.out:
            raise ValueError("--out: give the run folder")
        for name in ("steps", "batch_size", "val_every", "checkpoint_every", "crops_per_case"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        return self

    def roi_size(self) -> tuple[int, int, int]:
        """``img_size`` as (D, H, W): the crop and sliding-window size."""
        return roi_triple(self.img_size)

    def resample_spacing(self) -> float | None:
        """The spacing to resample to in mm; ``None`` keeps the input spacing (``spacing_mm`` <= 0 or ``None``)."""
        return None if self.spacing_mm is not None and self.spacing_mm <= 0 else self.spacing_mm

    def to_dict(self) -> dict[str, Any]:
        """Plain, weights-only-loadable values (the checkpoint's ``train_config``)."""
        return {k: plain_value(v) for k, v in asdict(self).items()}


def roi_triple(value: Sequence[int] | int) -> tuple[int, int, int]:
    """``--img-size``'s N or (D, H, W) as three positive ints."""
    v = list(value) if isinstance(value, (list, tuple)) else [value]
    v = v * 3 if len(v) == 1 else v
    if len(v) != 3 or min(v) < 1:
        raise ValueError(f"--img-size must be one or three positive ints, got {value}")
    return tuple(int(x) for x in v)  # type: ignore[return-value]


def plain_value(value: Any) -> Any:
    """A setting as a weights-only-loadable plain value: lists for tuples, strings for anything else.

    Not ``progress.json_plain`` (the JSON-event helper): that keeps unknown objects (a ``Path`` would then not
    load weights-only), turns non-finite floats into strings and unwraps numpy scalars; a checkpoint's
    ``train_config`` has always stored the values this way."""
    if isinstance(value, (int, float, str, bool, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    return str(value)
