"""The fine-tuning pipeline: pre-training's steps with a label key (``data.transforms`` is the image-only one).

Deterministic part (``preprocess_transforms``, run once per case): load, RAS, same-grid check
(``CheckSameGridd``), label remap to the task's ids (``RemapLabelsd``), CT check, spacing (bilinear for the
image, nearest for the label), HU window, foreground crop, pad to the crop size. Random part
(``augment_transforms``, per step): ``RandCropByPosNegLabeld`` on the label, flips on each axis and rot90.
Cases are dicts with the keys ``IMAGE`` and ``LABEL`` (and a ``name`` that errors quote).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from monai.transforms import (Compose, CropForegroundd, EnsureChannelFirstd, EnsureTyped, Orientationd,
                              RandCropByPosNegLabeld, RandFlipd, RandRotate90d, ScaleIntensityRanged, Spacingd,
                              SpatialPadd)

from ..data.transforms import HU_WINDOW, EnsureCTd, LoadCTd
from .labels import LabelMap, check_label_ids, class_lookup

IMAGE, LABEL = "image", "label"


class RemapLabelsd:
    """Check a label volume's ids against the source map, then map them to the task's ids."""

    def __init__(self, task: LabelMap, source: LabelMap | None) -> None:
        self.task, self.source = task, source
        self.lut = torch.as_tensor(class_lookup(task, source))

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        lab = d[LABEL]
        name = d.get("name", "label volume")
        values = torch.as_tensor(lab).as_subclass(torch.Tensor)
        if torch.any(values != torch.round(values)) or values.min() < 0:
            raise ValueError(f"{name}: the label volume holds non-integer or negative values (is it a label map?)")
        ints = values.long()
        if self.source is not None:
            check_label_ids(torch.unique(ints).numpy(), self.source, origin=f"{name}: label volume")
        if ints.max() >= self.lut.numel():
            raise ValueError(f"{name}: label id {int(ints.max())} is beyond the label map")
        mapped = self.lut[ints].to(torch.float32)
        d[LABEL] = lab.clone().copy_(mapped) if hasattr(lab, "meta") else mapped
        return d


class CheckSameGridd:
    """Clear error when a case's image and label are not on the same voxel grid."""

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        img, lab = data[IMAGE], data[LABEL]
        name = data.get("name", "case")
        if tuple(img.shape[1:]) != tuple(lab.shape[1:]):
            raise ValueError(f"{name}: image shape {tuple(img.shape[1:])} and label shape {tuple(lab.shape[1:])} "
                             "differ; image and label must share one voxel grid")
        a = np.asarray(getattr(img, "affine", np.eye(4)), dtype=np.float64)
        b = np.asarray(getattr(lab, "affine", np.eye(4)), dtype=np.float64)
        if not np.allclose(a, b, atol=1e-3 * max(1.0, float(np.abs(a).max()))):
            raise ValueError(f"{name}: image and label affines differ (origin {np.round(a[:3, 3], 2).tolist()} vs "
                             f"{np.round(b[:3, 3], 2).tolist()}, spacing {np.round(np.linalg.norm(a[:3, :3], axis=0), 3).tolist()} "
                             f"vs {np.round(np.linalg.norm(b[:3, :3], axis=0), 3).tolist()}); image and label must "
                             "share one voxel grid")
        return data


def preprocess_transforms(task: LabelMap, source: LabelMap | None, *, spacing_mm: Sequence[float] | float | None,
                          roi_size: Sequence[int], load: bool = True,
                          window: tuple[float, float] | None = None):
    """Deterministic part: pre-training's steps 1-5 with a label key (nearest resampling for labels)."""
    window = window or HU_WINDOW
    keys = [IMAGE, LABEL]
    steps: list[Any] = [LoadCTd(IMAGE), LoadCTd(LABEL), EnsureChannelFirstd(keys=keys)] if load else []
    # RAS first: a label exported with flipped or permuted axes (e.g. a DICOM series' NIfTI labels)
    # then lies on the image's grid; anything else is a real mismatch
    steps += [Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
              CheckSameGridd(), RemapLabelsd(task, source),
              EnsureCTd(keys=IMAGE, spacing_mm=spacing_mm if load else None)]  # + size guard before Spacingd
    if spacing_mm is not None:
        sp = tuple(spacing_mm) if isinstance(spacing_mm, (list, tuple)) else (float(spacing_mm),) * 3
        steps.append(Spacingd(keys=keys, pixdim=sp, mode=("bilinear", "nearest")))
    steps += [
        ScaleIntensityRanged(keys=IMAGE, a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(keys=keys, source_key=IMAGE, allow_smaller=True),
        SpatialPadd(keys=keys, spatial_size=tuple(roi_size), mode="constant"),
        EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False),
    ]
    return Compose(steps)


def augment_transforms(roi_size: Sequence[int], *, num_samples: int, pos: float, neg: float,
                       flip_prob: float = 0.2, rot90_prob: float = 0.2):
    """Random part: crops centred on labelled voxels ``pos : neg``, flips on each axis and rot90."""
    keys = [IMAGE, LABEL]
    return Compose([
        RandCropByPosNegLabeld(keys=keys, label_key=LABEL, spatial_size=tuple(roi_size), pos=pos, neg=neg,
                               num_samples=num_samples, image_key=IMAGE, image_threshold=0.0),
        RandFlipd(keys=keys, prob=flip_prob, spatial_axis=0),
        RandFlipd(keys=keys, prob=flip_prob, spatial_axis=1),
        RandFlipd(keys=keys, prob=flip_prob, spatial_axis=2),
        RandRotate90d(keys=keys, prob=rot90_prob, max_k=3, spatial_axes=(0, 1)),
    ])
