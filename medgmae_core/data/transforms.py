"""MONAI pipelines for pre-training and inference, and the HU window.

Pre-training, in order (MEDGMAE.md "Data"):

1. ``LoadImaged`` + ``EnsureChannelFirstd`` (then a CT sanity check),
2. ``Orientationd`` to RAS,
3. ``Spacingd`` to 1.5 mm (configurable),
4. ``ScaleIntensityRanged`` HU [-175, 250] -> [0, 1], clipped,
5. ``CropForegroundd`` and ``SpatialPadd`` up to at least the crop size,
6. ``RandCropByPosNegLabeld``: 96^3 crops centred on foreground 3:1, 3 per case,
7. ``RandFlipd`` on each axis and ``RandRotate90d``.

Steps 1-5 are deterministic (``preprocess_transforms``, what a cache stores);
6-7 are random (``augment_transforms``). ``pretrain_transforms`` chains both.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from ..errors import InputError, SizeLimitError, available_memory_bytes
from .readers import SimpleITKReader, read_image

HU_WINDOW: tuple[float, float] = (-175.0, 250.0)
KEY = "image"
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # explicit: silences a MONAI deprecation warning


class NotCTError(InputError):
    """A volume whose intensities do not look like Hounsfield units (also a ``ValueError``)."""


def root_exception(exc: BaseException) -> BaseException:
    """The exception MONAI's "applying transform ..." RuntimeErrors were raised from."""
    while exc.__cause__ is not None and str(exc).startswith("applying transform"):
        exc = exc.__cause__
    return exc


class Pipeline(Compose):
    """``Compose`` that raises our own ``ValueError`` (naming the file) instead of MONAI's wrapper,
    and does not log input statistics on failure."""

    def __init__(self, transforms, **kwargs) -> None:
        super().__init__(transforms, log_stats=False, **kwargs)

    def __call__(self, data, *args, **kwargs):
        try:
            return super().__call__(data, *args, **kwargs)
        except RuntimeError as exc:
            root = root_exception(exc)
            if root is not exc and isinstance(root, ValueError):
                raise root from None
            raise


def window_hu(array, window: tuple[float, float] = HU_WINDOW):
    """Clip HU to ``window`` and rescale to [0, 1] (numpy array or torch tensor, dtype kept if floating)."""
    lo, hi = float(window[0]), float(window[1])
    if hi <= lo:
        raise ValueError(f"HU window must have low < high, got {window}")
    if isinstance(array, torch.Tensor):
        x = array if array.is_floating_point() else array.float()
        return ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
    x = np.asarray(array)
    x = x.astype(np.float32) if not np.issubdtype(x.dtype, np.floating) else x
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def ct_intensity_problem(volume, max_samples: int = 2_000_000) -> str | None:
    """Why ``volume`` (HU) does not look like a CT, or None if it does.

    A CT has some fat, lung or air (<= -100 HU) and plenty of soft tissue
    (-200..300 HU); MR, PET, or an already-normalised CT have neither.
    """
    x = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    x = x.reshape(-1)
    if x.size == 0:
        return "empty volume"
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():  # every voxel, not a sample
        bad = int(x.size - np.count_nonzero(np.isfinite(x)))
        return f"non-finite voxel values ({bad} NaN or inf voxels)"
    if x.size > max_samples:
        x = x[:: x.size // max_samples + 1]
    x = x.astype(np.float32, copy=False)
    low = float(np.mean(x <= -100.0))
    soft = float(np.mean((x >= -200.0) & (x <= 300.0)))
    lo, hi = float(x.min()), float(x.max())
    if lo == hi:
        return f"constant volume (every voxel is {lo:g}); not a CT"
    if low < 0.005 or soft < 0.05:
        return (f"intensities do not look like CT Hounsfield units (range {lo:.4g}..{hi:.4g}; "
                f"{100 * low:.1f}% <= -100 HU, {100 * soft:.1f}% soft tissue)")
    return None


# ------------------------------------------------------------------ size guard
DEFAULT_MAX_VOXELS = 100_000_000   # prepared-grid voxels a command works on by default (--max-voxels overrides)
UPSAMPLE_WARN_FACTOR = 2.0         # warn when resampling makes an axis more than this many times finer


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: float | Sequence[float] | None
                    ) -> tuple[int, int, int]:
    """Grid size after resampling ``shape`` at ``spacing`` mm to ``target`` mm, corner-aligned like
    ``inference.prepare_ct`` (``(n - 1) * s / t + 1``, at least 2); ``target=None`` keeps the grid."""
    if target is None:
        return tuple(int(n) for n in shape)  # type: ignore[return-value]
    t = np.broadcast_to(np.asarray(target, dtype=np.float64), (3,))
    return tuple(max(2, int(round((int(n) - 1) * float(sp) / float(tt))) + 1)
                 for n, sp, tt in zip(shape, spacing, t))  # type: ignore[return-value]


def check_resample_size(shape: Sequence[int], spacing: Sequence[float], target: float | Sequence[float] | None, *,
                        max_voxels: int | None = None, bytes_per_voxel: float = 24.0, what: str = "CT",
                        spacing_option: str | None = "--spacing-mm",
                        override_option: str | None = "--max-voxels") -> tuple[int, int, int]:
    """Estimate the prepared grid and its memory *before* working; refuse it when too big, warn on upsampling.

    Refuses (``SizeLimitError``, naming ``--max-voxels`` and the spacing) when the prepared grid has more than
    ``max_voxels`` voxels (default :data:`DEFAULT_MAX_VOXELS`) or, with the default limit, when the estimated
    memory (``bytes_per_voxel`` per prepared voxel) exceeds the memory available. An explicit ``max_voxels``
    is the user's override of both. Logs a warning for every axis upsampled by more than
    :data:`UPSAMPLE_WARN_FACTOR`. Returns the prepared shape.
    """
    spacing = [float(v) for v in spacing]
    if target is not None:
        t = np.broadcast_to(np.asarray(target, dtype=np.float64), (3,))
        if not np.all(np.isfinite(t)) or np.any(t <= 0):
            raise InputError(f"{spacing_option} must be positive, got {target}")
    new = resampled_shape(shape, spacing, target)
    voxels = int(np.prod(new, dtype=np.float64))
    need = voxels * float(bytes_per_voxel)
    limit = DEFAULT_MAX_VOXELS if max_voxels is None else int(max_voxels)
    src = "x".join(str(int(n)) for n in shape)
    sp = "x".join(f"{v:.3g}" for v in spacing)
    grid = "x".join(str(n) for n in new)
    desc = (f"{what}: {src} voxels at {sp} mm" + (f" resampled to {float(np.max(target)):.3g} mm" if target is not None
                                                   else "") + f" is {grid} = {voxels / 1e6:.1f} M voxels "
            f"(about {need / 2**30:.1f} GB of memory)")
    remedies = ", ".join(["check the CT's voxel spacing"] + ([f"use a coarser {spacing_option}"] if spacing_option
                                                              else []) + ["crop the CT"])
    if voxels > limit:
        raise SizeLimitError(f"{desc}, above the limit of {limit / 1e6:g} M voxels; {remedies}"
                             + (f", or raise {override_option}" if override_option else ""))
    if max_voxels is None:
        available = available_memory_bytes()
        if available is not None and need > available:
            raise SizeLimitError(f"{desc}, more than the {available / 2**30:.1f} GB of memory available; {remedies}"
                                 + (f" (or pass {override_option} to try anyway)" if override_option else ""))
    if target is not None:
        for axis, (n_old, n_new) in enumerate(zip(shape, new)):
            factor = (n_new - 1) / max(1, int(n_old) - 1)
            if factor > UPSAMPLE_WARN_FACTOR:
                logging.getLogger(__name__).warning(
                    "%s: upsampling axis %d by %.1fx (%d -> %d voxels, %.3g mm -> %.3g mm): the result is interpolated "
                    "from a much coarser CT", what, axis, factor, int(n_old), n_new, spacing[axis],
                    float(np.broadcast_to(np.asarray(target, dtype=np.float64), (3,))[axis]))
    return new


class LoadCTd(LoadImaged):
    """Load images through ``data.readers.read_image``, the one reader every command uses (nibabel for NIfTI,
    SimpleITK for NRRD/MHA and checked DICOM series folders), as float32 ``MetaTensor`` s in file voxel order with
    their RAS affine, like ``LoadImaged(image_only=True)`` with ``NibabelReader``.

    Any read failure is one ``InputError`` (a ``ValueError``) naming the file; ``[X, Y, Z, 1]`` is 3D.
    """

    def __init__(self, keys: str = KEY) -> None:
        super().__init__(keys=keys, reader=SimpleITKReader(), image_only=True, dtype=np.float32)

    def __call__(self, data, reader=None):
        d = dict(data)
        for key in self.key_iterator(d):
            path = str(d[key])
            array, affine = read_image(path, what="image")
            meta = {"filename_or_obj": path, "original_affine": affine.copy(),
                    "spatial_shape": np.asarray(array.shape), "original_channel_dim": "no_channel", "space": "RAS"}
            d[key] = MetaTensor(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)),
                                affine=torch.as_tensor(affine, dtype=torch.float64), meta=meta)
        return d


class EnsureCTd(MapTransform):
    """Raise ``NotCTError`` naming the file if an image is not a 3D single-channel CT in HU; with
    ``spacing_mm``, also ``SizeLimitError`` if resampling it to that spacing would exceed ``max_voxels``
    (:func:`check_resample_size`), before the resampling is attempted."""

    def __init__(self, keys=KEY, spacing_mm: float | Sequence[float] | None = None,
                 max_voxels: int | None = None) -> None:
        super().__init__(keys)
        self.spacing_mm = spacing_mm
        self.max_voxels = max_voxels

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            name = getattr(img, "meta", {}).get("filename_or_obj", key)
            if img.ndim != 4 or img.shape[0] != 1:
                raise NotCTError(f"{name}: expected a single-channel 3D volume, got array shape {tuple(img.shape)}")
            if min(img.shape[1:]) < 2:
                raise NotCTError(f"{name}: 2D image (shape {tuple(img.shape[1:])}); a 3D CT is needed")
            problem = ct_intensity_problem(img)
            if problem:
                raise NotCTError(f"{name}: {problem}")
            if self.spacing_mm is not None and hasattr(img, "affine"):
                affine = np.asarray(img.affine, dtype=np.float64)
                check_resample_size(tuple(img.shape[1:]), np.linalg.norm(affine[:3, :3], axis=0),
                                    self.spacing_mm, max_voxels=self.max_voxels, what=str(name),
                                    spacing_option="spacing", override_option=None)
        return d


class ForegroundLabeld(MapTransform):
    """Add ``label_key``: 1 where the (windowed) image is above ``threshold``, the crop sampler's foreground."""

    def __init__(self, keys: str = KEY, label_key: str = "foreground", threshold: float = 0.0) -> None:
        super().__init__(keys)
        self.label_key = label_key
        self.threshold = threshold

    def __call__(self, data):
        d = dict(data)
        key = self.first_key(d)
        d[self.label_key] = (d[key] > self.threshold).to(torch.uint8)
        return d


def _as3(value: float | Sequence[float]) -> tuple:
    v = tuple(value) if isinstance(value, (list, tuple)) else (value,) * 3
    if len(v) != 3:
        raise ValueError(f"expected one value or three, got {value!r}")
    return v


def load_transforms(keys: str = KEY, spacing_mm: float | Sequence[float] | None = None) -> list:
    """Load (NIfTI via nibabel, NRRD/MHA/DICOM via SimpleITK) as channel-first float32, then check it is CT
    (and, with ``spacing_mm``, that resampling it there stays within the size limit)."""
    return [
        LoadCTd(keys=keys),
        EnsureChannelFirstd(keys=keys),
        EnsureCTd(keys=keys, spacing_mm=spacing_mm),
    ]


def preprocess_transforms(spacing_mm: float | Sequence[float] = 1.5, roi_size: int | Sequence[int] = 96, *,
                          load: bool = True, window: tuple[float, float] = HU_WINDOW, keys: str = KEY) -> Pipeline:
    """Deterministic steps 1-5: load, RAS, resample, HU window, foreground crop, pad to >= ``roi_size``."""
    roi = tuple(int(r) for r in _as3(roi_size))
    spacing = tuple(float(s) for s in _as3(spacing_mm))
    steps = load_transforms(keys, spacing) if load else [EnsureCTd(keys=keys)]  # in memory: the caller checked
    steps += [
        Orientationd(keys=keys, axcodes="RAS", labels=_RAS_LABELS),
        Spacingd(keys=keys, pixdim=tuple(float(s) for s in _as3(spacing_mm)), mode="bilinear"),
        ScaleIntensityRanged(keys=keys, a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(keys=keys, source_key=keys, allow_smaller=True),
        SpatialPadd(keys=keys, spatial_size=roi, mode="constant"),
        EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False),
    ]
    return Pipeline(steps)


def augment_transforms(roi_size: int | Sequence[int] = 96, *, num_samples: int = 3, pos: float = 3.0,
                       neg: float = 1.0, flip_prob: float = 0.2, rot90_prob: float = 0.2, keys: str = KEY) -> Pipeline:
    """Random steps 6-7: ``num_samples`` foreground-weighted crops (pos:neg), flips on each axis and rot90.

    Foreground is any voxel above the window's bottom (HU > -175): 3 crops in 4
    are centred on the body, 1 in 4 anywhere else.
    """
    roi = tuple(int(r) for r in _as3(roi_size))
    if num_samples < 1:
        raise ValueError(f"crops per case must be >= 1, got {num_samples}")
    return Pipeline([
        ForegroundLabeld(keys=keys, label_key="foreground"),
        RandCropByPosNegLabeld(keys=keys, label_key="foreground", spatial_size=roi, pos=pos, neg=neg,
                               num_samples=num_samples),
        DeleteItemsd(keys="foreground"),
        RandFlipd(keys=keys, prob=flip_prob, spatial_axis=0),
        RandFlipd(keys=keys, prob=flip_prob, spatial_axis=1),
        RandFlipd(keys=keys, prob=flip_prob, spatial_axis=2),
        RandRotate90d(keys=keys, prob=rot90_prob, max_k=3, spatial_axes=(0, 1)),
    ])


def pretrain_transforms(spacing_mm: float | Sequence[float] = 1.5, roi_size: int | Sequence[int] = 96, *,
                        num_samples: int = 3, pos: float = 3.0, neg: float = 1.0, load: bool = True,
                        window: tuple[float, float] = HU_WINDOW, keys: str = KEY) -> Pipeline:
    """The whole pre-training pipeline (steps 1-7): a dict ``{"image": path}`` -> list of crops ``[1, *roi]``."""
    return Pipeline([
        preprocess_transforms(spacing_mm, roi_size, load=load, window=window, keys=keys),
        augment_transforms(roi_size, num_samples=num_samples, pos=pos, neg=neg, keys=keys),
    ])


def inference_transforms(spacing_mm: float | Sequence[float] | None = 1.5, *, load: bool = True,
                         window: tuple[float, float] = HU_WINDOW, pad_to: int | Sequence[int] | None = None,
                         crop_foreground: bool = False, keys: str = KEY) -> Pipeline:
    """Deterministic pipeline for the demo, Slicer and reconstruction: load, RAS, resample, window.

    No random crop; the result keeps its MetaTensor affine so it can be
    inverted (``monai.transforms.Invertd``) back onto the input grid.
    ``spacing_mm=None`` keeps the input spacing.
    """
    spacing = None if spacing_mm is None else tuple(float(s) for s in _as3(spacing_mm))
    steps = load_transforms(keys, spacing) if load else [EnsureCTd(keys=keys)]  # in memory: the caller checked
    steps.append(Orientationd(keys=keys, axcodes="RAS", labels=_RAS_LABELS))
    if spacing_mm is not None:
        steps.append(Spacingd(keys=keys, pixdim=tuple(float(s) for s in _as3(spacing_mm)), mode="bilinear"))
    steps.append(ScaleIntensityRanged(keys=keys, a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True))
    if crop_foreground:
        steps.append(CropForegroundd(keys=keys, source_key=keys, allow_smaller=True))
    if pad_to is not None:
        steps.append(SpatialPadd(keys=keys, spatial_size=_as3(pad_to), mode="constant"))
    steps.append(EnsureTyped(keys=keys, dtype=torch.float32))
    return Pipeline(steps)
