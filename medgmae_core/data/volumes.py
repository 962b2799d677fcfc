"""Volumes on disk, for every command: read, write, datalists, and grid checks.

The orientation rule (one, for every reader and writer): an image is ``(array, affine)`` with the array in the
file's own voxel order ``[i, j, k]`` and ``affine`` the 4x4 map from voxel index to RAS millimetres. Nothing is
reoriented or resampled on reading: NIfTI keeps its stored voxel order and affine (nibabel), NRRD / MetaImage and
DICOM series (SimpleITK, LPS) get the equivalent RAS affine. Code that needs a canonical orientation says so where
it happens, with ``closest_ras`` (the model's inputs in ``inference.prepare_ct``, simulated scans in
``recon.simulation``) or MONAI ``Orientationd("RAS")`` in the training pipelines; grids are compared
and resampled here (``same_grid``, ``reorient_to``, ``resample_*``). Writing is NIfTI with that affine as qform
and sform, atomic (temporary file, then rename).

Reading is ``data.readers.read_image``, the one reader (DICOM series checked, errors name the file);
``read_datalist`` is the one MONAI datalist parser (``{"training": [{"image": ..., "label": ...}], ...}``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np

from ..errors import atomic_path


@dataclass
class Volume:
    """``array`` [X, Y, Z] and its ``affine`` (voxel index -> RAS mm); ``path`` for messages."""

    array: np.ndarray
    affine: np.ndarray
    path: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]


def read_volume(path: str | Path, *, what: str = "image") -> Volume:
    """A 3D volume from a NIfTI file, a DICOM series folder, or an NRRD/MHA file: ``data.readers.read_image``,
    the one reader every command uses (errors name the file; ``[X, Y, Z, 1]`` is 3D; DICOM series checked)."""
    from .readers import read_image  # lazy: MONAI and SimpleITK (~2.5 s); inference and export.nifti import this module

    array, affine = read_image(path, what=what)
    return Volume(array, affine, str(path))


def write_nifti(array: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Write ``array`` [X, Y, Z] with ``affine`` as NIfTI (qform and sform set, code 1 = scanner).

    Atomic: written to a temporary file beside ``path`` (registered with ``errors``, so a failed command removes
    it), then renamed; a full disk never leaves a partial NIfTI under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


def same_grid(a_shape, a_affine, b_shape, b_affine, *, atol_mm: float = 1e-3) -> bool:
    return tuple(a_shape) == tuple(b_shape) and np.allclose(a_affine, b_affine, atol=atol_mm)


def voxel_map(from_affine: np.ndarray, to_affine: np.ndarray) -> np.ndarray:
    """4x4 taking voxel indices of the ``to`` grid to voxel indices of the ``from`` grid."""
    return np.linalg.inv(from_affine) @ to_affine


def resample_nearest(array: np.ndarray, affine: np.ndarray, out_shape, out_affine: np.ndarray,
                     *, fill: int = 0, mode: str = "constant") -> np.ndarray:
    """Nearest-neighbour resampling of a label array onto another grid (exact output shape).
    ``mode="nearest"`` extends edge labels to output voxels just outside the input grid."""
    from scipy import ndimage  # lazy: ~0.3 s, and inference / export.nifti (light paths) import this module

    m = voxel_map(affine, out_affine)
    return ndimage.affine_transform(array, m[:3, :3], m[:3, 3], output_shape=tuple(int(s) for s in out_shape),
                                    order=0, mode=mode, cval=fill)


def resample_linear(array: np.ndarray, affine: np.ndarray, out_shape, out_affine: np.ndarray) -> np.ndarray:
    """Trilinear resampling of an intensity array onto another grid (exact output shape, float32); output voxels
    just outside the input grid take the nearest edge value."""
    from scipy import ndimage  # lazy: ~0.3 s, and inference / export.nifti (light paths) import this module

    m = voxel_map(affine, out_affine)
    return ndimage.affine_transform(np.asarray(array, dtype=np.float32), m[:3, :3], m[:3, 3],
                                    output_shape=tuple(int(s) for s in out_shape), order=1, mode="nearest")


def closest_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The canonical orientation, where one is needed: ``array`` flipped / permuted to the closest RAS axes and
    its affine to match (no resampling; nibabel's ``as_closest_canonical``, MONAI's ``Orientationd("RAS")``)."""
    array = np.asarray(array)
    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    out = np.ascontiguousarray(nib.orientations.apply_orientation(array, ornt))
    return out, np.asarray(affine, dtype=np.float64) @ nib.orientations.inv_ornt_aff(ornt, array.shape)


def reorient_to(array: np.ndarray, affine: np.ndarray, ref_shape, ref_affine: np.ndarray, *,
                what: str = "volume", ref_what: str = "reference", atol_mm: float = 1e-2) -> np.ndarray:
    """``array`` on the reference grid when both describe the same voxels up to axis flips or
    permutations (e.g. a DICOM series and its NIfTI export); a clear error otherwise."""
    if same_grid(array.shape, affine, ref_shape, ref_affine, atol_mm=atol_mm):
        return array
    m = voxel_map(affine, ref_affine)
    rot, shift = m[:3, :3], m[:3, 3]
    is_perm = (np.allclose(np.abs(rot).sum(0), 1, atol=1e-4) and np.allclose(np.abs(rot), np.round(np.abs(rot)), atol=1e-4))
    corners = np.array([[i, j, k] for i in (0, ref_shape[0] - 1) for j in (0, ref_shape[1] - 1)
                        for k in (0, ref_shape[2] - 1)], dtype=np.float64)
    mapped = corners @ rot.T + shift
    inside = mapped.min() > -1e-3 and np.all(mapped.max(0) < np.asarray(array.shape) - 1 + 1e-3)
    covers = sorted(array.shape) == sorted(ref_shape) and inside
    if not (is_perm and np.allclose(shift, np.round(shift), atol=1e-3) and covers):
        raise ValueError(
            f"{what} and {ref_what} are on different voxel grids: {what} shape {tuple(array.shape)}, spacing "
            f"{np.round(np.linalg.norm(affine[:3, :3], axis=0), 3).tolist()}, origin {np.round(affine[:3, 3], 2).tolist()}"
            f"; {ref_what} shape {tuple(ref_shape)}, spacing {np.round(np.linalg.norm(ref_affine[:3, :3], axis=0), 3).tolist()}"
            f", origin {np.round(ref_affine[:3, 3], 2).tolist()}. Resample one onto the other first.")
    return resample_nearest(array, affine, ref_shape, ref_affine)


def read_datalist(path: str | Path, key: str = "training", *, fields: Sequence[str] = ("image",),
                  missing_ok: bool = False) -> list[dict[str, Any]]:
    """Entries ``{field: path, ..., "name": image path}`` under ``key`` of a MONAI datalist JSON, paths relative
    to the JSON's folder resolved. A bare list counts as ``"training"``, a bare string entry as its image.
    ``missing_ok``: no list under ``key`` gives ``[]`` instead of an error."""
    path = Path(path)
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable datalist JSON ({exc})") from exc
    if isinstance(content, dict):
        entries = content.get(key, [] if missing_ok else None)
    else:  # a bare list: the training cases
        entries = content if key == "training" or not missing_ok else []
    if not isinstance(entries, list):
        raise ValueError(f"{path}: datalist has no list under key {key!r}")
    cases = []
    for i, entry in enumerate(entries):
        item = entry if isinstance(entry, dict) else {"image": entry}
        if any(not isinstance(item.get(f), str) for f in fields):
            raise ValueError(f"{path}: entry {i} of {key!r} needs {' and '.join(repr(f) for f in fields)} path(s)")
        case = {f: str(Path(item[f]) if Path(item[f]).is_absolute() else path.parent / item[f]) for f in fields}
        cases.append({**case, "name": case[fields[0]]})
    return cases
