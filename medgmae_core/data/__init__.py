"""CT data: the built-in phantom, MONAI transforms, input discovery and deterministic pre-training crops."""
from .datasets import (
    PretrainCrops,
    SkipReport,
    crop_batches,
    discover_volumes,
    load_datalist,
    parse_phantom_spec,
    phantom_cases,
    validate_volumes,
)
from .phantom import LABEL_NAMES, Phantom, make_phantom, write_phantom_nifti
from .transforms import (
    HU_WINDOW,
    NotCTError,
    augment_transforms,
    inference_transforms,
    preprocess_transforms,
    pretrain_transforms,
    window_hu,
)

__all__ = [
    "HU_WINDOW", "LABEL_NAMES", "NotCTError", "Phantom", "PretrainCrops", "SkipReport", "augment_transforms",
    "crop_batches", "discover_volumes", "inference_transforms", "load_datalist", "make_phantom", "parse_phantom_spec",
    "phantom_cases", "preprocess_transforms", "pretrain_transforms", "validate_volumes", "window_hu",
    "write_phantom_nifti",
]
