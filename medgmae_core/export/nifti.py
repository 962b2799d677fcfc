"""NIfTI export of predictions and masks, and reading volumes back with their affines.

Reading (NIfTI, NRRD/MHA, DICOM folders) and the NIfTI writer itself live in ``data.volumes``; this module adds the
export conventions: predictions as float32, masks and label maps as uint8, checked shapes and affines.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import spatial
from ..data.volumes import Volume, read_volume, write_nifti


def write_volume(path: str | Path, array, ijk_to_ras, *, kind: str = "prediction") -> Path:
    """Write ``array [I, J, K]`` with ``ijk_to_ras``: ``kind="prediction"`` as float32, ``"mask"``/``"labels"``
    as uint8. Returns the path."""
    if kind not in ("prediction", "mask", "labels"):
        raise ValueError(f"kind must be 'prediction', 'mask' or 'labels', got {kind!r}")
    arr = array.detach().cpu().numpy() if hasattr(array, "detach") else np.asarray(array)
    if arr.ndim != 3:
        raise ValueError(f"{kind} array for {path} must be 3D [I, J, K], got shape {arr.shape}")
    affine = spatial.check_affine(ijk_to_ras)
    if kind == "prediction":
        arr = arr.astype(np.float32)
    else:
        if arr.min(initial=0) < 0 or arr.max(initial=0) > 255:
            raise ValueError(f"{kind} values for {path} must be in [0, 255], got {arr.min()}..{arr.max()}")
        arr = np.rint(arr).astype(np.uint8)
    path = Path(path)
    if not path.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"NIfTI output path must end in .nii or .nii.gz, got {path}")
    return write_nifti(arr, affine, path)


def read_volume_array(path: str | Path, *, what: str = "volume") -> tuple[np.ndarray, np.ndarray]:
    """``(array [I, J, K], ijk_to_ras)`` from NIfTI, NRRD/MHA or a DICOM folder (via ``data.volumes.read_volume``)."""
    vol: Volume = read_volume(path, what=what)
    return np.asarray(vol.array), np.asarray(vol.affine, dtype=np.float64)


__all__ = ["write_volume", "read_volume_array"]
