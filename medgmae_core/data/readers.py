"""Image reading: the one reader every command uses, a MONAI ``ImageReader`` over SimpleITK, header checks.

* :func:`read_image` / :func:`read_ct`: the one way a command reads a volume (``demo``, ``segment``, ``render
  --like``, ``reconstruct``, label maps in ``evaluate``): NIfTI through nibabel, NRRD/MetaImage and DICOM series
  folders through SimpleITK, every failure an ``errors.InputError`` naming the file. One rule for shapes:
  trailing singleton axes are dropped (``[X, Y, Z, 1]`` is a 3D volume), anything else that is not 3D is refused.
  ``read_ct`` adds the CT checks (at least 2 voxels per axis, finite values, Hounsfield-like intensities).
* :func:`read_dicom_series`: a DICOM folder's largest series, checked before it is stacked: every file that
  could not be read is named, slice positions must be evenly spaced along one normal with one orientation
  (no gaps, no duplicates). Such series are refused unless resampling is asked for (``--resample-dicom``,
  :func:`set_resample_dicom`), which linearly resamples the readable slices onto a uniform grid, as
  3D Slicer's DICOM loader offers to.
* :class:`SimpleITKReader`: a MONAI ``ImageReader`` over the same SimpleITK path (DICOM folders go through
  :func:`read_dicom_series`). The MONAI pipelines (pre-training, fine-tuning) load with
  ``data.transforms.LoadCTd``, which calls :func:`read_image`. Arrays come out in index order (i, j, k) with a
  RAS affine, exactly like MONAI's ``NibabelReader``, so the rest of the MONAI pipeline cannot tell them apart.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from monai.data.image_reader import ImageReader

from .. import spatial
from ..errors import InputError

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Files that are certainly not DICOM slices (never reported as unreadable slices of a series).
NOT_DICOM_SUFFIXES = VOLUME_SUFFIXES + (".json", ".txt", ".md", ".csv", ".png", ".jpg", ".jpeg", ".py", ".yaml",
                                        ".yml", ".pt", ".raw", ".zraw", ".h5", ".gz", ".zip", ".pdf", ".npy", ".npz",
                                        ".xml", ".html", ".log", ".ply", ".mrb")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
SPACING_TOLERANCE_MM = 0.01  # slice spacing may vary by this much (or 1% of the spacing, if larger)

_DICOM_OPTIONS = {"resample": False}


def set_resample_dicom(enabled: bool) -> None:
    """Default for :func:`read_dicom_series`: resample uneven series instead of refusing them (``--resample-dicom``)."""
    _DICOM_OPTIONS["resample"] = bool(enabled)


def resample_dicom_default() -> bool:
    return _DICOM_OPTIONS["resample"]


def has_suffix(path: str | Path, suffixes: Sequence[str]) -> bool:
    name = str(path).lower()
    return any(name.endswith(s) for s in suffixes)


def dicom_series_files(folder: str | Path) -> list[str]:
    """Files of the largest DICOM series in ``folder`` (sorted by GDCM), or [] if there is none."""
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


class _QuietITK:
    """Silence ITK's own stderr warnings (e.g. "Non uniform sampling") while reading: we report problems ourselves."""

    def __enter__(self):
        self._sitk = sitk
        self._warn = sitk.ProcessObject.GetGlobalWarningDisplay()
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
        return self

    def __exit__(self, *exc) -> None:
        self._sitk.ProcessObject.SetGlobalWarningDisplay(self._warn)


def _short_reason(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():  # ITK messages: "sitk::ERROR: ..." after a file:line header
        if "ERROR:" in line:
            return line.split("ERROR:", 1)[1].strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:200]


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _name_list(names: Sequence[str], limit: int = 10) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass
class SeriesCheck:
    """What :func:`check_dicom_series` found: readable slices sorted by position, and the problems."""

    folder: str
    files: list[str]
    positions: np.ndarray       # mm along the slice normal, sorted
    normal: np.ndarray
    step: float                 # the series' slice spacing (median of the gaps), mm
    unreadable: dict[str, str]  # file name -> reason
    problems: list[str]

    @property
    def uniform(self) -> bool:
        return not self.problems and not self.unreadable


def check_dicom_series(folder: str | Path, files: Sequence[str] | None = None) -> SeriesCheck:
    """Check a DICOM series before stacking it: unreadable files, orientation, slice size, even slice positions."""
    folder = Path(folder)
    files = list(files if files is not None else dicom_series_files(folder))
    in_series = {str(Path(f).resolve()) for f in files}
    unreadable: dict[str, str] = {}
    infos = []
    with _QuietITK():
        for f in files:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(f))
            try:
                reader.ReadImageInformation()
            except RuntimeError as exc:
                unreadable[Path(f).name] = _short_reason(exc)
                continue
            infos.append((str(f), np.asarray(reader.GetOrigin(), np.float64),
                          np.asarray(reader.GetDirection(), np.float64).reshape(3, 3), tuple(reader.GetSize()[:2])))
        for entry in sorted(folder.iterdir()):  # slices GDCM left out because it could not parse them
            if (not entry.is_file() or entry.name.startswith(".") or entry.name.upper() == "DICOMDIR"
                    or str(entry.resolve()) in in_series or has_suffix(entry, NOT_DICOM_SUFFIXES)):
                continue
            if not (_has_dicom_magic(entry) or has_suffix(entry, DICOM_SUFFIXES)):
                continue
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(entry))
            try:
                reader.ReadImageInformation()
            except RuntimeError as exc:
                reason = _short_reason(exc)
                size = entry.stat().st_size
                unreadable[entry.name] = ("empty file" if size == 0 else
                                          "truncated or damaged" if "Unable to determine ImageIO" in reason else reason)
    problems: list[str] = []
    if not infos:
        return SeriesCheck(str(folder), [], np.zeros(0), np.array([0.0, 0.0, 1.0]), 0.0, unreadable,
                           ["no readable slices"])
    first_dir = infos[0][2]
    normal = first_dir[:, 2] / max(np.linalg.norm(first_dir[:, 2]), 1e-12)
    odd_orientation = [Path(f).name for f, _, d, _ in infos if np.abs(d[:, :2] - first_dir[:, :2]).max() > 1e-3]
    if odd_orientation:
        problems.append(f"slice orientation differs from the first slice in {_name_list(odd_orientation)}")
    odd_size = [Path(f).name for f, _, _, size in infos if size != infos[0][3]]
    if odd_size:
        problems.append(f"slice size differs from {infos[0][3]} in {_name_list(odd_size)}")
    positions = np.array([float(o @ normal) for _, o, _, _ in infos])
    order = np.argsort(positions, kind="stable")
    infos = [infos[i] for i in order]
    positions = positions[order]
    sorted_files = [f for f, _, _, _ in infos]
    step = 0.0
    if len(positions) >= 2:
        gaps = np.diff(positions)
        step = float(np.median(gaps))
        dup = np.flatnonzero(gaps < 1e-3)
        if len(dup):
            problems.append("slices at the same position: " + _name_list(
                [f"{Path(sorted_files[i]).name} and {Path(sorted_files[i + 1]).name}" for i in dup], 3))
        tol = max(SPACING_TOLERANCE_MM, 0.01 * step)
        bad = [i for i in np.flatnonzero(np.abs(gaps - step) > tol) if gaps[i] >= 1e-3]
        if bad and step > 1e-3:
            described = [f"{gaps[i]:.3g} mm between {Path(sorted_files[i]).name} and {Path(sorted_files[i + 1]).name}"
                         for i in bad]
            missing = sum(max(0, int(round(gaps[i] / step)) - 1) for i in bad)
            problems.append(f"slice spacing is not uniform ({step:.4g} mm, but {_name_list(described, 3)}"
                            + (f"; about {missing} slice(s) missing" if missing else "") + ")")
        lateral = np.array([o - (o @ normal) * normal for _, o, _, _ in infos])
        if np.abs(lateral - lateral[0]).max() > max(0.5, step):
            problems.append("slices are not stacked along their normal (sheared or mixed series)")
    return SeriesCheck(str(folder), sorted_files, positions, normal, step, unreadable, problems)


def read_dicom_series(folder: str | Path, files: Sequence[str] | None = None, *, resample: bool | None = None):
    """The largest DICOM series in ``folder`` as a SimpleITK image, checked by :func:`check_dicom_series`.

    A series with unreadable files, uneven spacing, missing slices or mixed orientations is refused (an
    ``InputError`` naming the files and gaps) unless ``resample`` (default: :func:`set_resample_dicom`), which
    linearly resamples the readable slices onto a uniform grid at the series' spacing, from the first slice
    to the last.
    """
    folder = Path(folder)
    resample = resample_dicom_default() if resample is None else bool(resample)
    files = list(files if files is not None else dicom_series_files(folder))
    if not files:
        raise InputError(f"{folder}: no DICOM series found in this folder")
    check = check_dicom_series(folder, files)
    fixable = not [p for p in check.problems if not p.startswith("slice spacing")]
    if not check.uniform:
        parts = []
        if check.unreadable:
            parts.append(f"{len(check.unreadable)} file(s) could not be read: "  # every one, by name
                         + _name_list([f"{n} ({r})" for n, r in check.unreadable.items()], len(check.unreadable)))
        parts += check.problems
        detail = "; ".join(parts)
        if not resample or not fixable or len(check.files) < 2:
            hint = (" Pass --resample-dicom to resample the readable slices onto a uniform grid."
                    if fixable and len(check.files) >= 2 else "")
            raise InputError(f"DICOM series {folder}: {detail}.{hint}")
        log.warning("DICOM series %s: %s; resampling the %d readable slices onto a uniform %.4g mm grid "
                    "(--resample-dicom)", folder, detail, len(check.files), check.step)
    with _QuietITK():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(list(files) if check.uniform else list(check.files))  # good series: GDCM's order
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            bad = _failing_files(check.files)
            raise InputError(f"DICOM series {folder}: cannot read "
                             + (_name_list(bad) if bad else "the series") + f" ({_short_reason(exc)})") from None
    if check.uniform or len(check.files) < 2:
        return image
    return _resample_slices(image, check)


def _failing_files(files: Sequence[str]) -> list[str]:
    bad = []
    with _QuietITK():
        for f in files:
            try:
                sitk.ReadImage(str(f))
            except RuntimeError:
                bad.append(Path(f).name)
    return bad


def _resample_slices(image, check: SeriesCheck):
    """Linear interpolation of the stacked slices (at ``check.positions``) onto uniform positions."""
    array = sitk.GetArrayFromImage(image).astype(np.float32)  # [k, j, i], slices in check.files order
    pos = check.positions - check.positions[0]
    n = int(round(pos[-1] / check.step)) + 1
    target = np.arange(n) * check.step
    hi = np.clip(np.searchsorted(pos, target, side="right"), 1, len(pos) - 1)
    lo = hi - 1
    w = np.clip((target - pos[lo]) / np.maximum(pos[hi] - pos[lo], 1e-9), 0.0, 1.0).astype(np.float32)
    out = array[lo] * (1 - w)[:, None, None] + array[hi] * w[:, None, None]
    result = sitk.GetImageFromArray(out)
    first = sitk.ImageFileReader()
    first.SetFileName(check.files[0])
    with _QuietITK():
        first.ReadImageInformation()
    direction = np.asarray(first.GetDirection(), np.float64).reshape(3, 3).copy()
    direction[:, 2] = check.normal
    result.SetOrigin(first.GetOrigin())
    result.SetSpacing((*image.GetSpacing()[:2], check.step))
    result.SetDirection(tuple(direction.reshape(-1)))
    return result


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
        path = Path(data if isinstance(data, (str, Path)) else list(data)[0])
        if path.is_dir():
            return read_dicom_series(path)
        with _QuietITK():
            return sitk.ReadImage(str(path))

    def get_data(self, img) -> tuple[np.ndarray, dict]:
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
            files = dicom_series_files(path)
            if not files:
                raise ValueError("no DICOM series found in this folder")
            info = sitk.ImageFileReader()
            info.SetFileName(files[0])
            info.ReadImageInformation()
            size = list(info.GetSize())[:2]
            return VolumeHeader(shape=(*size, len(files)), spacing=tuple(info.GetSpacing()))
        if has_suffix(path, NIFTI_SUFFIXES):
            img = nib.load(str(path))
            shape = tuple(int(n) for n in img.shape)
            return VolumeHeader(shape=shape, spacing=tuple(float(s) for s in img.header.get_zooms()))
        info = sitk.ImageFileReader()
        info.SetFileName(str(path))
        info.ReadImageInformation()
        return VolumeHeader(shape=tuple(info.GetSize()), spacing=tuple(info.GetSpacing()))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    except Exception as exc:  # nibabel / ITK raise assorted types for unreadable files
        raise ValueError(f"{path}: unreadable image header ({type(exc).__name__}: {exc})") from exc


# ------------------------------------------------------------------ the one volume reader
def _folder_problem(path: Path) -> str:
    """Why a folder holds no DICOM series, for the message."""
    try:
        entries = [e for e in path.iterdir() if not e.name.startswith(".")]
    except OSError as exc:
        return f"cannot list the folder ({exc.strerror})"
    if not entries:
        return "empty folder; expected a DICOM series (or give a NIfTI/NRRD/MHA file)"
    volumes = sorted(e.name for e in entries if has_suffix(e, VOLUME_SUFFIXES))
    if volumes:
        return f"no DICOM series in this folder; it holds volume files ({_name_list(volumes, 3)}): give one of them"
    return (f"no DICOM series in this folder ({len(entries)} {'entry' if len(entries) == 1 else 'entries'}, none a "
            "readable DICOM image)")


def read_image(path: str | Path, *, what: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """``(array [I, J, K], ijk_to_ras)`` from a NIfTI / NRRD / MetaImage file or a DICOM series folder.

    Every failure is an ``InputError`` naming the file (``FileNotFoundError`` for a missing path). Trailing
    singleton axes are dropped (``[X, Y, Z, 1]`` -> ``[X, Y, Z]``); any other non-3D image is refused. The
    affine must be finite and invertible (positive, finite voxel spacing).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        if path.is_dir():
            files = dicom_series_files(path)
            if not files:
                raise InputError(f"{what} {path}: {_folder_problem(path)}")
            reader = SimpleITKReader()
            array, meta = reader.get_data(read_dicom_series(path, files))
            affine = np.asarray(meta["affine"], dtype=np.float64)
        elif has_suffix(path, NIFTI_SUFFIXES):
            if path.stat().st_size == 0:
                raise InputError(f"cannot read {what} {path}: empty file")
            img = nib.load(str(path))
            array, affine = np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)
        elif has_suffix(path, ITK_SUFFIXES):
            if path.stat().st_size == 0:
                raise InputError(f"cannot read {what} {path}: empty file")
            with _QuietITK():
                image = sitk.ReadImage(str(path))
            if image.GetNumberOfComponentsPerPixel() != 1:
                raise InputError(f"{what} {path}: expected one intensity per voxel, got "
                                 f"{image.GetNumberOfComponentsPerPixel()} (a colour or vector image)")
            array = sitk.GetArrayFromImage(image)
            array = array.transpose(*reversed(range(array.ndim)))  # [k, j, i] -> [i, j, k]
            dim = image.GetDimension()
            if dim == 3:
                affine = _sitk_affine_ras(image)
            else:
                affine = np.eye(4)
        else:
            raise InputError(f"{what} {path}: unsupported format (use NIfTI .nii/.nii.gz, NRRD, MHA or a DICOM "
                             "series folder)")
    except (InputError, FileNotFoundError):
        raise
    except MemoryError:
        raise
    except Exception as exc:  # nibabel / SimpleITK / gzip raise assorted types for damaged files
        reason = _short_reason(exc)
        if isinstance(exc, (EOFError, OSError)) or "Expected" in reason or "truncated" in reason.lower():
            reason = f"truncated or damaged file ({reason})"
        raise InputError(f"cannot read {what} {path}: {reason}") from None
    array = np.asarray(array)
    while array.ndim > 3 and array.shape[-1] == 1:  # one rule everywhere: [X, Y, Z, 1] is a 3D volume
        array = array[..., 0]
    if array.ndim != 3:
        kind = f"{array.ndim}D image" if array.ndim != 4 else f"4D image ({array.shape[3]} volumes)"
        raise InputError(f"{what} {path}: {kind} of shape {tuple(array.shape)}; a single 3D volume is needed")
    try:
        affine = spatial.check_affine(affine, f"{what} {path}: affine")
    except ValueError as exc:
        raise InputError(str(exc)) from None
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"{what} {path}: invalid voxel spacing {spacing.tolist()}")
    return array, affine


def read_ct(path: str | Path, *, what: str = "CT", check_ct: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """:func:`read_image` plus the CT checks: at least 2 voxels per axis, finite values and (``check_ct``)
    Hounsfield-like intensities (``data.transforms.ct_intensity_problem``). Returns float32 HU and the affine."""
    from .transforms import NotCTError, ct_intensity_problem  # lazy: data.transforms imports this module (cycle)

    array, affine = read_image(path, what=what)
    if min(array.shape) < 2:
        raise InputError(f"{what} {Path(path)}: shape {tuple(array.shape)} is a 2D image or a single slice; a 3D "
                         "CT with at least 2 voxels per axis is needed")
    array = np.asarray(array, dtype=np.float32)
    if check_ct:
        problem = ct_intensity_problem(array)
    elif not np.isfinite(array).all():
        problem = f"non-finite voxel values ({int(array.size - np.count_nonzero(np.isfinite(array)))} NaN or inf voxels)"
    elif float(array.min()) == float(array.max()):
        problem = f"constant volume (every voxel is {float(array.min()):g}); nothing to work on"
    else:
        problem = None
    if problem:
        raise NotCTError(f"{what} {Path(path)}: {problem}")
    return array, affine
