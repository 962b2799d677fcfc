"""CT data: the built-in phantom, MONAI transforms, input discovery and deterministic pre-training crops.

Names are imported lazily, so ``medgmae_core.data.phantom`` stays light (numpy and
scipy only) while ``from medgmae_core.data import pretrain_transforms`` still works.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "datasets": ("PretrainCrops", "SkipReport", "crop_batches", "discover_volumes", "load_datalist",
                 "parse_phantom_spec", "phantom_cases", "validate_volumes"),
    "phantom": ("LABEL_NAMES", "Phantom", "make_phantom", "write_phantom_nifti"),
    "transforms": ("HU_WINDOW", "NotCTError", "augment_transforms", "inference_transforms", "preprocess_transforms",
                   "pretrain_transforms", "window_hu"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)


def __dir__() -> list[str]:
    return __all__
