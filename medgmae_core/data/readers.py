"""Image reading: a MONAI ``ImageReader`` over SimpleITK (NRRD, MetaImage, DICOM series) and cheap header checks.

NIfTI goes through MONAI's own ``NibabelReader``; everything else SimpleITK
reads (its GDCM build decodes JPEG2000 DICOM, which pydicom alone cannot).
Arrays come out in index order (i, j, k) with a RAS affine, exactly like
``NibabelReader``, so the rest of the MONAI pipeline cannot tell them apart.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from monai.data.image_reader import ImageReader

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def has_suffix(path: str | Path, suffixes: Sequence[str]) -> bool:
    name = str(path).lower()
    return any(name.endswith(s) for s in suffixes)


def dicom_series_files(folder: str | Path) -> list[str]:
    """Files of the largest DICOM series in ``folder`` (sorted by GDCM), or [] if there is none."""
    import SimpleITK as sitk

    folder = str(folder)
    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # "No Series were found" is an answer, not a problem
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder) or ()
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warn)
    best: list[str] = []
    for sid in series:
        files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, sid))
        if len(files) > len(best):
            best = files
    if len(series) > 1:
        log.warning("%s holds %d DICOM series; using the largest (%d files)", folder, len(series), len(best))
    return best


def _sitk_affine_ras(image) -> np.ndarray:
    """RAS affine (index i, j, k -> mm) of a SimpleITK image (whose physical space is LPS)."""
    direction = np.asarray(image.GetDirection(), np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(image.GetSpacing(), np.float64)[None, :]
    affine[:3, 3] = image.GetOrigin()
    return _LPS_TO_RAS @ affine


class SimpleITKReader(ImageReader):
    """MONAI reader for NRRD / MetaImage files and DICOM series folders, through SimpleITK."""

    def verify_suffix(self, filename: Sequence[str | Path] | str | Path) -> bool:
        names = [filename] if isinstance(filename, (str, Path)) else list(filename)
        return len(names) == 1 and (has_suffix(names[0], ITK_SUFFIXES) or Path(names[0]).is_dir())

    def read(self, data: Sequence[str | Path] | str | Path, **kwargs: Any):
        import SimpleITK as sitk

        path = Path(data if isinstance(data, (str, Path)) else list(data)[0])
        if path.is_dir():
            files = dicom_series_files(path)
            if not files:
                raise ValueError(f"{path}: no DICOM series found in this folder")
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            return reader.Execute()
        return sitk.ReadImage(str(path))

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        import SimpleITK as sitk

        if img.GetDimension() != 3:
            raise ValueError(f"expected a 3D image, got {img.GetDimension()}D")
        if img.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(f"expected one intensity per voxel, got {img.GetNumberOfComponentsPerPixel()}")
        array = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # [k,j,i] -> [i,j,k]
        affine = _sitk_affine_ras(img)
        meta = {
            "affine": affine,
            "original_affine": affine.copy(),
            "spatial_shape": np.asarray(array.shape),
            "space": "RAS",
            "original_channel_dim": float("nan"),
            "pixdim": np.asarray([1.0, *img.GetSpacing(), 1, 1, 1, 1]),
        }
        return np.ascontiguousarray(array), meta


@dataclass(frozen=True)
class VolumeHeader:
    shape: tuple[int, ...]
    spacing: tuple[float, ...]


def read_header(path: str | Path) -> VolumeHeader:
    """Shape and spacing from the header only (no voxel data); raises ValueError naming the file.

    For a DICOM folder the shape is (columns, rows, number of files) and the
    spacing comes from the first slice's header (its third value is not the slice spacing).
    """
    path = Path(path)
    try:
        if path.is_dir():
            import SimpleITK as sitk

            files = dicom_series_files(path)
            if not files:
                raise ValueError("no DICOM series found in this folder")
            info = sitk.ImageFileReader()
            info.SetFileName(files[0])
            info.ReadImageInformation()
            size = list(info.GetSize())[:2]
            return VolumeHeader(shape=(*size, len(files)), spacing=tuple(info.GetSpacing()))
        if has_suffix(path, NIFTI_SUFFIXES):
            import nibabel as nib

            img = nib.load(str(path))
            shape = tuple(int(n) for n in img.shape)
            return VolumeHeader(shape=shape, spacing=tuple(float(s) for s in img.header.get_zooms()))
        import SimpleITK as sitk

        info = sitk.ImageFileReader()
        info.SetFileName(str(path))
        info.ReadImageInformation()
        return VolumeHeader(shape=tuple(info.GetSize()), spacing=tuple(info.GetSpacing()))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    except Exception as exc:  # nibabel / ITK raise assorted types for unreadable files
        raise ValueError(f"{path}: unreadable image header ({type(exc).__name__}: {exc})") from exc
