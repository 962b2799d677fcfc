"""Prediction with a pre-trained Gaussian model: CT preparation, one window, and sliding windows.

Pipeline: HU array + IJK->RAS affine -> ``prepare_ct`` (the steps of ``data.transforms.inference_transforms``:
RAS orientation, resampling to the model spacing, HU window [-175, 250] -> [0, 1]) -> 96^3 windows ->
``model.predict_gaussians`` (batched) -> each window's Gaussians mapped into the whole prepared volume's
normalised coordinates (``spatial.window_to_volume``) -> one merged GaussianSet (-> RAS with
``spatial.gaussians_to_world(merged, prepared.shape, prepared.ijk_to_ras)``).

Merging overlapping windows (no doubled intensity): along each axis the windows' offsets ``o_0 < o_1 < ...``
split space into *partition cells* whose boundaries sit at the middle of each overlap,
``b_t = (o_{t-1} + n - 1 + o_t) / 2`` (the outermost cells are unbounded). A window keeps only the Gaussians whose
centre (in voxels) falls in its own cell, and a stitched voxel volume (render, mask) takes each voxel from the
window whose cell holds it. Cells tile space without overlap, so every Gaussian is kept by exactly one window,
and the kept ones are those farthest from a window edge, where the model sees the most context.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import spatial
from .data.volumes import closest_ras
from .gaussians import GaussianSet

DEFAULT_SPACING_MM = 1.5
DEFAULT_OVERLAP = 6  # minimum overlap in voxels (9 mm at 1.5 mm); windows are spread evenly, so most overlap more


# ----------------------------------------------------------------------------- preparation
@dataclass
class PreparedCT:
    """A CT on the model's grid: ``volume [D, H, W]`` windowed to [0, 1] and its ``ijk_to_ras``."""

    volume: torch.Tensor
    ijk_to_ras: np.ndarray
    source_shape: tuple[int, int, int]
    source_affine: np.ndarray
    seconds: float = 0.0

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.volume.shape)  # type: ignore[return-value]


def prepare_ct(hu, ijk_to_ras, *, spacing_mm: float | Sequence[float] | None = DEFAULT_SPACING_MM,
               check_ct: bool = True) -> PreparedCT:
    """HU array ``[I, J, K]`` with its affine -> :class:`PreparedCT`, the steps of
    ``data.transforms.inference_transforms`` done lean for big in-memory volumes:

    1. (``check_ct``) ``data.transforms.ct_intensity_problem``: refuse volumes that are not in HU (NotCTError);
    2. reorient to the closest RAS axes (flips / axis swaps, nibabel orientations), like ``Orientationd``;
    3. resample to ``spacing_mm`` with trilinear ``torch.nn.functional.interpolate`` on a corner-aligned grid
       (first and last voxel centres kept; ``spacing_mm=None`` keeps the spacing);
    4. ``data.transforms.window_hu``: HU [-175, 250] -> [0, 1].

    MONAI's ``Spacingd`` does the same resampling but took ~30 s and 1.8 GB for a 512x512x300 CT here; this
    takes ~2 s and ~0.5 GB.
    """
    # lazy: data.transforms loads MONAI (~2 s), which a caller that never prepares a CT does not need
    from .data.transforms import NotCTError, ct_intensity_problem, window_hu

    t0 = time.perf_counter()
    affine = spatial.check_affine(ijk_to_ras)
    array = hu.detach().cpu().numpy() if isinstance(hu, torch.Tensor) else np.asarray(hu)
    if array.ndim != 3:
        raise ValueError(f"CT array must be 3D [I, J, K], got shape {tuple(array.shape)}")
    if min(array.shape) < 2:
        raise ValueError(f"CT array must have at least 2 voxels per axis, got shape {tuple(array.shape)}")
    source_shape = tuple(int(n) for n in array.shape)
    if check_ct:
        problem = ct_intensity_problem(array)
        if problem:
            raise NotCTError(f"CT array: {problem}")
    array, affine = closest_ras(array, affine)
    volume = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if spacing_mm is not None:
        target = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
        if np.any(target <= 0):
            raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")
        old_shape = tuple(volume.shape)
        new_shape = tuple(max(2, int(round((n - 1) * s / t)) + 1)
                          for n, s, t in zip(old_shape, spatial.spacing_of(affine), target))
        if new_shape != old_shape:
            volume = F.interpolate(volume[None, None], size=new_shape, mode="trilinear", align_corners=True)[0, 0]
            affine = spatial.resampled_affine(affine, old_shape, new_shape)
    volume = window_hu(volume).contiguous()
    return PreparedCT(volume, affine, source_shape, spatial.check_affine(ijk_to_ras), time.perf_counter() - t0)


# ----------------------------------------------------------------------------- window layout
def axis_offsets(size: int, window: int, overlap: int, *, pad_last: bool = False) -> list[int]:
    """Window start positions along one axis of ``size`` voxels.

    ``size <= window``: one window, centred (negative offset; the outside is zero-padded). Otherwise the fewest
    windows whose overlaps are all >= ``overlap``, spread evenly from the first voxel to the last; or with
    ``pad_last`` every ``window - overlap`` voxels with the last one padded past the edge (used with
    ``overlap=0``: no window overlaps another).
    """
    if window < 2 or size < 1:
        raise ValueError(f"window must be >= 2 and size >= 1, got window={window}, size={size}")
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must be in [0, {window - 1}] voxels for a {window}-voxel window, got {overlap}")
    if size <= window:
        return [-((window - size) // 2)]
    step = window - overlap
    count = -(-(size - window) // step) + 1  # fewest windows whose overlaps are all >= overlap
    if pad_last:
        return [t * step for t in range(count)]
    return sorted({int(round(v)) for v in np.linspace(0, size - window, count)})  # spread evenly


def axis_boundaries(offsets: Sequence[int], window: int) -> np.ndarray:
    """Partition-cell boundaries (voxel coords) for one axis: ``[-inf, b_1, ..., b_{T-1}, inf]``."""
    o = np.asarray(offsets, dtype=np.float64)
    mids = (o[:-1] + window - 1 + o[1:]) / 2.0
    return np.concatenate([[-np.inf], mids, [np.inf]])


@dataclass
class WindowGrid:
    """Sliding windows over a volume: per-axis offsets, their product, and the partition cells."""

    volume_shape: tuple[int, int, int]
    window_shape: tuple[int, int, int]
    axis_offsets: list[list[int]]
    boundaries: list[np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.boundaries = [axis_boundaries(o, n) for o, n in zip(self.axis_offsets, self.window_shape)]

    @property
    def counts(self) -> tuple[int, int, int]:
        return tuple(len(o) for o in self.axis_offsets)  # type: ignore[return-value]

    def __len__(self) -> int:
        return math.prod(self.counts)

    def index(self, t: int) -> tuple[int, int, int]:
        return tuple(int(v) for v in np.unravel_index(t, self.counts))  # type: ignore[return-value]

    def offset(self, t: int) -> tuple[int, int, int]:
        return tuple(self.axis_offsets[a][i] for a, i in enumerate(self.index(t)))  # type: ignore[return-value]

    def offsets(self) -> np.ndarray:
        """``[T, 3]`` window offsets in window order (C order over the per-axis lists)."""
        return np.array([self.offset(t) for t in range(len(self))], dtype=np.int64).reshape(-1, 3)

    def cell(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Voxel-coordinate bounds ``[lo, hi)`` of window ``t``'s cell (may be infinite)."""
        idx = self.index(t)
        lo = np.array([self.boundaries[a][i] for a, i in enumerate(idx)])
        hi = np.array([self.boundaries[a][i + 1] for a, i in enumerate(idx)])
        return lo, hi

    def cell_slices(self, t: int) -> tuple[slice, slice, slice]:
        """The voxels ``v`` of the volume with ``lo <= v < hi`` for window ``t``'s cell."""
        lo, hi = self.cell(t)
        return tuple(slice(int(np.clip(math.ceil(l), 0, n)) if np.isfinite(l) else 0,
                           int(np.clip(math.ceil(h), 0, n)) if np.isfinite(h) else n)
                     for l, h, n in zip(lo, hi, self.volume_shape))  # type: ignore[return-value]

    def in_cell(self, t: int, centres_voxel: torch.Tensor) -> torch.Tensor:
        """Boolean mask over ``centres_voxel [..., 3]``: centre inside window ``t``'s cell."""
        lo, hi = self.cell(t)
        lo_t = torch.as_tensor(lo, dtype=centres_voxel.dtype, device=centres_voxel.device)
        hi_t = torch.as_tensor(hi, dtype=centres_voxel.dtype, device=centres_voxel.device)
        return ((centres_voxel >= lo_t) & (centres_voxel < hi_t)).all(-1)


def window_grid(volume_shape, window_shape, overlap: int | Sequence[int] = DEFAULT_OVERLAP, *,
                pad_last: bool = False) -> WindowGrid:
    """The sliding-window layout for a volume (see :func:`axis_offsets`)."""
    vol = spatial.check_shape(volume_shape, "volume_shape")
    win = spatial.check_shape(window_shape, "window_shape")
    ov = [int(overlap)] * 3 if np.isscalar(overlap) else [int(v) for v in overlap]
    if len(ov) != 3:
        raise ValueError(f"overlap must be one integer or three, got {overlap!r}")
    return WindowGrid(vol, win, [axis_offsets(s, w, o, pad_last=pad_last) for s, w, o in zip(vol, win, ov)])


def extract_window(volume: torch.Tensor, offset, window_shape) -> torch.Tensor:
    """``volume [D, H, W]`` -> ``[d, h, w]`` starting at ``offset`` (any integers); zeros outside the volume."""
    out = volume.new_zeros(tuple(int(n) for n in window_shape))
    src, dst = [], []
    for o, n, size in zip(offset, window_shape, volume.shape):
        a, b = max(0, int(o)), min(size, int(o) + int(n))
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - int(o), b - int(o)))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def centred_offset(centre_voxel, volume_shape, window_shape) -> tuple[int, int, int]:
    """Offset of the window centred on ``centre_voxel``, moved inside the volume where the volume allows."""
    out = []
    for c, size, n in zip(np.asarray(centre_voxel, dtype=np.float64).reshape(3), volume_shape, window_shape):
        o = int(round(float(c) - (n - 1) / 2.0))
        out.append(-((n - size) // 2) if size <= n else int(np.clip(o, 0, size - n)))
    return tuple(out)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- prediction
def model_window_shape(model) -> tuple[int, int, int]:
    try:
        return tuple(int(n) for n in model.config.img_size)  # type: ignore[return-value]
    except AttributeError:
        raise ValueError("model must have config.img_size (a MedGMAE model from train.checkpoint.load_model)") from None


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@dataclass
class WindowPrediction:
    """One window: its Gaussians in the window's coords and in the whole volume's coords."""

    offset: tuple[int, int, int]
    window_gaussians: GaussianSet
    gaussians: GaussianSet
    seconds: float


def mask_arguments(mask_policy: str | None, mask_ratio: float | None) -> dict:
    """The keyword arguments for ``model.predict_gaussians``: only what the caller chose (the model's own
    default inference mask policy applies otherwise, see ``model.medgmae.DEFAULT_MASK_POLICY``)."""
    out = {}
    if mask_policy is not None:
        out["mask_policy"] = mask_policy
    if mask_ratio is not None:
        out["mask_ratio"] = mask_ratio
    return out


def predict_window(model, prepared: PreparedCT, *, centre_voxel=None, centre_ras=None,
                   mask_policy: str | None = None, mask_ratio: float | None = None,
                   generator: torch.Generator | None = None) -> WindowPrediction:
    """Predict the model window (``config.img_size``) centred on a voxel or RAS point of the prepared CT
    (default: the volume centre). ``mask_policy`` / ``mask_ratio``: see ``MedGMAE.predict_gaussians``."""
    win = model_window_shape(model)
    if centre_ras is not None:
        centre_voxel = spatial.ras_to_voxel(np.asarray(centre_ras, dtype=np.float64), prepared.ijk_to_ras)
    if centre_voxel is None:
        centre_voxel = (np.asarray(prepared.shape) - 1) / 2.0
    offset = centred_offset(centre_voxel, prepared.shape, win)
    t0 = time.perf_counter()
    x = extract_window(prepared.volume, offset, win)[None, None].to(_model_device(model))  # [1, 1, d, h, w]
    local = model.predict_gaussians(x, **mask_arguments(mask_policy, mask_ratio), generator=generator).detach().to("cpu")
    merged = spatial.window_to_volume(local, offset, win, prepared.shape)
    return WindowPrediction(offset, local, merged, time.perf_counter() - t0)


@dataclass
class VolumePrediction:
    """Sliding-window result: merged Gaussians (``[1, n]``, whole-volume normalised coords) and, when asked,
    the stitched render ``pred [D, H, W]`` and patch ``mask [D, H, W]`` (1 = hidden from the encoder)."""

    gaussians: GaussianSet
    grid: WindowGrid
    pred: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    seconds: float = 0.0
    kept_per_window: list[int] = field(default_factory=list)


PredictFn = Callable[[torch.Tensor], GaussianSet]


def merge_window_gaussians(window_sets: Sequence[GaussianSet], grid: WindowGrid) -> tuple[GaussianSet, list[int]]:
    """Map each window's Gaussians (window ``t``'s coords, batch 1) to volume coords and keep those whose centre
    lies in window ``t``'s partition cell and inside the volume (within half a voxel of its first and last voxel
    centres: windows padded past the edge predict Gaussians in the padding, which is not the CT). Returns the
    merged ``[1, n]`` set and the count kept per window."""
    if len(window_sets) != len(grid):
        raise ValueError(f"{len(window_sets)} window Gaussian sets for a grid of {len(grid)} windows")
    kept, counts = [], []
    extent = torch.tensor([n - 1 for n in grid.volume_shape], dtype=torch.float64)
    for t, local in enumerate(window_sets):
        mapped = spatial.window_to_volume(local, grid.offset(t), grid.window_shape, grid.volume_shape)
        voxel = mapped.centres[0].double() * extent.to(mapped.device)  # [n, 3]
        inside = ((voxel >= -0.5) & (voxel <= extent.to(mapped.device) + 0.5)).all(-1)
        keep = grid.in_cell(t, voxel) & inside
        kept.append(mapped.select(keep))
        counts.append(int(keep.sum()))
    return GaussianSet.cat(kept), counts


def predict_volume(model, prepared: PreparedCT | torch.Tensor, *, overlap: int = DEFAULT_OVERLAP,
                   batch_size: int = 2, mask_policy: str | None = None, mask_ratio: float | None = None,
                   pad_last: bool = False,
                   stitch: bool = False, generator: torch.Generator | None = None,
                   predict_fn: PredictFn | None = None,
                   progress: Callable[[int, int], None] | None = None) -> VolumePrediction:
    """Sliding-window prediction over a whole prepared CT, merged without double counting (module docstring).

    Without ``stitch`` every window is predicted with ``model.predict_gaussians`` (``mask_policy`` /
    ``mask_ratio`` as there; the model's default inference policy when both are None). ``stitch=True`` runs the
    model's training-style forward pass with one random mask at ``mask_ratio`` (default: the training ratio) and
    also stitches its rendered windows and patch masks into whole-volume ``pred`` / ``mask``. ``predict_fn`` replaces
    ``model.predict_gaussians`` (tests use a known-answer predictor); ``progress(done, total)`` is called per batch.
    """
    volume = prepared.volume if isinstance(prepared, PreparedCT) else prepared
    if volume.dim() != 3:
        raise ValueError(f"volume must be [D, H, W], got shape {tuple(volume.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    win = model_window_shape(model)
    grid = window_grid(volume.shape, win, overlap, pad_last=pad_last)
    device = _model_device(model)
    t0 = time.perf_counter()
    sets: list[GaussianSet] = []
    pred = volume.new_zeros(volume.shape) if stitch else None
    mask = volume.new_zeros(volume.shape) if stitch else None
    offsets = grid.offsets()
    for start in range(0, len(grid), batch_size):
        idx = range(start, min(start + batch_size, len(grid)))
        x = torch.stack([extract_window(volume, offsets[t], win) for t in idx])[:, None].to(device)  # [b, 1, d, h, w]
        if stitch:
            with torch.no_grad():
                was_training = model.training
                model.eval()
                try:
                    out = model(x, mask_ratio=mask_ratio, generator=generator)  # None: the training ratio
                finally:
                    model.train(was_training)
            batch_sets = out.gaussians.detach().to("cpu")
            window_pred = out.pred[:, 0].detach().to(volume.device, volume.dtype)  # [b, d, h, w]
            window_mask = model.mask_volume(out.mask)[:, 0].to(volume.device, volume.dtype)
            for j, t in enumerate(idx):
                _paste_cell(pred, window_pred[j], grid, t)
                _paste_cell(mask, window_mask[j], grid, t)
        elif predict_fn is not None:
            batch_sets = predict_fn(x).detach().to("cpu")
        else:
            batch_sets = model.predict_gaussians(x, **mask_arguments(mask_policy, mask_ratio),
                                                 generator=generator).detach().to("cpu")
        if batch_sets.batch_size != len(idx):
            raise ValueError(f"predictor returned {batch_sets.batch_size} Gaussian sets for {len(idx)} windows")
        sets.extend(batch_sets[j] for j in range(len(idx)))
        if progress is not None:
            progress(idx[-1] + 1, len(grid))
    merged, counts = merge_window_gaussians(sets, grid)
    return VolumePrediction(merged, grid, pred, mask, time.perf_counter() - t0, counts)


def _paste_cell(target: torch.Tensor, window: torch.Tensor, grid: WindowGrid, t: int) -> None:
    """Copy the part of a window's voxels that lies in its partition cell into the whole-volume ``target``."""
    cell = grid.cell_slices(t)
    off = grid.offset(t)
    src = tuple(slice(s.start - o, s.stop - o) for s, o in zip(cell, off))
    target[cell] = window[src]


__all__ = [
    "DEFAULT_SPACING_MM", "DEFAULT_OVERLAP", "PreparedCT", "prepare_ct", "axis_offsets", "axis_boundaries",
    "WindowGrid", "window_grid", "extract_window", "centred_offset", "WindowPrediction", "predict_window",
    "VolumePrediction", "merge_window_gaussians", "predict_volume", "model_window_shape", "mask_arguments",
]
