"""Per-class Dice and HD95 (mm) of label maps, as JSON and a table (the library of ``medgmae evaluate``).

Classes are matched by name when both label maps are known (the prediction's sidecar
``<pred>.labels.json`` written by ``medgmae segment``, or ``--pred-labels``; the reference's
``--labels``), so a 4-class prediction can be scored against a 117-label TotalSegmentator map.
Otherwise ids are compared as they are.

Conventions (as nnU-Net / MONAI): a class absent from both volumes has Dice ``null`` and is left out
of the mean; a class present in only one of them has Dice 0 and HD95 ``null`` (infinite). HD95 is the
95th percentile of the symmetric surface distances, in mm using the reference's voxel spacing.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.volumes import read_volume, reorient_to
from .labels import LabelMap, check_label_ids, remap_labels, sidecar_path


def dice_score(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty."""
    p, r = int(pred.sum()), int(ref.sum())
    if p + r == 0:
        return math.nan
    return 2.0 * int(np.logical_and(pred, ref).sum()) / (p + r)


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (MONAI); NaN if both empty, inf if one is."""
    from monai.metrics import compute_hausdorff_distance  # lazy: heavy (~2 s); Dice-only scoring never loads it

    if not pred.any() and not ref.any():
        return math.nan
    if not pred.any() or not ref.any():
        return math.inf
    both = np.logical_or(pred, ref)
    lo = np.maximum(np.argwhere(both).min(0) - 1, 0)
    hi = np.argwhere(both).max(0) + 2
    box = tuple(slice(a, b) for a, b in zip(lo, hi))  # surfaces only need the union's bounding box
    p = torch.from_numpy(np.ascontiguousarray(pred[box]))[None, None]
    r = torch.from_numpy(np.ascontiguousarray(ref[box]))[None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # MONAI's deprecated always_return_as_numpy default
        value = compute_hausdorff_distance(p, r, include_background=True, percentile=95,
                                           spacing=[float(s) for s in spacing])
    return float(value.reshape(-1)[0])


def evaluate_arrays(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float, float],
                    names: dict[int, str], *, with_hd95: bool = True) -> dict[str, Any]:
    """Per-class Dice/HD95 for ``names`` (id -> name; both volumes use these ids) and their means."""
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    per_class: dict[str, dict[str, Any]] = {}
    for idx in sorted(names):
        p, r = pred == idx, ref == idx
        d = dice_score(p, r)
        h = hd95(p, r, spacing) if with_hd95 else math.nan
        per_class[names[idx]] = {
            "id": int(idx), "dice": None if math.isnan(d) else d,
            "hd95_mm": None if (math.isnan(h) or math.isinf(h)) else h,
            "pred_voxels": int(p.sum()), "ref_voxels": int(r.sum()),
        }
    dices = [c["dice"] for c in per_class.values() if c["dice"] is not None]
    hds = [c["hd95_mm"] for c in per_class.values() if c["hd95_mm"] is not None]
    return {
        "mean_dice": float(np.mean(dices)) if dices else None,
        "mean_hd95_mm": float(np.mean(hds)) if hds else None,
        "num_classes_scored": len(dices),
        "spacing_mm": [float(s) for s in spacing],
        "classes": per_class,
    }


def format_table(result: dict[str, Any]) -> str:
    """A fixed-width text table of the per-class metrics and the means."""
    rows = [("class", "id", "Dice", "HD95 mm", "pred vox", "ref vox")]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for name, c in result["classes"].items():
        rows.append((name, str(c["id"]), fmt(c["dice"], ".4f"), fmt(c["hd95_mm"], ".2f"),
                     str(c["pred_voxels"]), str(c["ref_voxels"])))
    rows.append(("mean", "", fmt(result["mean_dice"], ".4f"), fmt(result["mean_hd95_mm"], ".2f"), "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)


def _reference_ids(name: str, idx: int, task: LabelMap, ref_map: LabelMap) -> tuple[int, ...]:
    """Reference ids of a predicted class: by name, else the ids it was trained from (a merged class
    such as ``kidneys=kidney_left+kidney_right`` keeps them in its ``sources``)."""
    if name in ref_map.names.values():
        return (ref_map.id_of(name),)
    src = (task.sources or {}).get(idx)
    if src and all(s in ref_map.names for s in src):
        return tuple(src)
    return (ref_map.id_of(name),)  # raises, naming the class and close matches


def _load_map(path: str | Path | None) -> LabelMap | None:
    return LabelMap.from_json(path) if path else None


def evaluate_files(pred_path: str | Path, ref_path: str | Path, *, labels: str | Path | None = None,
                   pred_labels: str | Path | None = None, classes: str | None = None,
                   with_hd95: bool = True) -> dict[str, Any]:
    """Score a predicted label file against a reference label file (NIfTI/NRRD; the reference may
    also be a DICOM-derived NIfTI on a flipped/permuted grid of the same voxels)."""
    pred_vol = read_volume(pred_path, what="prediction")
    ref_vol = read_volume(ref_path, what="reference")
    ref_map = _load_map(labels)
    if pred_labels is None and sidecar_path(pred_path).is_file():
        pred_labels = sidecar_path(pred_path)
    pred_map = _load_map(pred_labels) or ref_map

    pred = reorient_to(np.asarray(pred_vol.array), pred_vol.affine, ref_vol.shape, ref_vol.affine,
                       what=f"prediction {pred_path}", ref_what=f"reference {ref_path}")
    ref = np.asarray(ref_vol.array)
    for arr, what in ((pred, f"prediction {pred_path}"), (ref, f"reference {ref_path}")):
        if np.any(np.mod(arr, 1) != 0) or arr.min() < 0:
            raise ValueError(f"{what} is not a label map (values must be non-negative integers)")

    if pred_map is not None and ref_map is not None:
        # score in the prediction's id space: reference labels are renamed by name
        task = pred_map.select(classes) if classes else pred_map
        if classes:
            pred = remap_labels(pred, task, pred_map, origin=f"prediction {pred_path}")
        ref_task = LabelMap(dict(task.names), {k: _reference_ids(n, k, task, ref_map) for k, n in task.names.items()})
        ref = remap_labels(ref, ref_task, ref_map, origin=f"reference {ref_path}")
        names = task.names
    elif pred_map is not None or ref_map is not None:
        lmap = pred_map or ref_map
        check_label_ids(pred, lmap, origin=f"prediction {pred_path}")
        check_label_ids(ref, lmap, origin=f"reference {ref_path}")
        wanted = [c.strip() for c in classes.split(",")] if classes else [lmap.names[i] for i in lmap.ids]
        names = {lmap.id_of(n): n for n in wanted}
    else:
        ids = sorted((set(np.unique(pred).tolist()) | set(np.unique(ref).tolist())) - {0})
        if classes:
            ids = [int(c) for c in classes.split(",")]
        names = {int(i): f"label_{int(i)}" for i in ids}
    result = evaluate_arrays(pred, ref, ref_vol.spacing, names, with_hd95=with_hd95)
    result.update(pred=str(pred_path), ref=str(ref_path))
    return result
