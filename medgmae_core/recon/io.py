"""Projection data for reconstruction: the file format, real scans, and simulated scans.

File format ``medgmae-projections/1`` (``.npz`` or ``.h5``/``.hdf5``)
---------------------------------------------------------------------
Arrays (npz keys, or HDF5 datasets at the root):

* ``projections`` float32 ``[V, rows, cols]``: line integrals ``-log(I/I0)``,
  i.e. the integral in mm of the attenuation (1/mm) along each ray;
* ``angles`` float64 ``[V]``: gantry angles in **radians**;
* optional ``reference`` float32 ``[D, H, W]``: a ground-truth volume in the
  same attenuation units (simulated scans), used for PSNR/SSIM;
* optional ``affine`` float64 ``[4, 4]``: ijk-to-RAS of the reconstruction grid
  (written into the output NIfTI).

Geometry (npz: scalar/small-array keys; HDF5: attributes of the root group):

* ``format`` = ``"medgmae-projections/1"``; ``geometry`` = ``"parallel"`` or ``"cone"``;
* ``detector_spacing`` ``[dv, du]`` mm (rows, cols); ``detector_offset`` in
  columns (the rotation axis projects to column ``(cols-1)/2 + offset``);
* ``volume_shape`` ``[D, H, W]`` of the reconstruction grid and
  ``volume_extent_mm`` ``[3]`` (``(N_a - 1) * spacing_a``), centred on the
  rotation axis = volume axis 2 (see ``medgmae_core.xray.geometry``);
* cone only: ``source_to_origin`` and ``source_to_detector`` in mm;
* optional ``mu_water`` (1/mm): the attenuation of water in these units, so the
  reconstruction can be read as HU (``HU = 1000 (mu / mu_water - 1)``).

Real data: APS data-exchange HDF5 (``exchange/data``, ``data_white``,
``data_dark``, ``theta`` in degrees) is normalised to line integrals with
``-log((I - dark) / (white - dark))``, the transmission clamped to
``[1e-4, inf)`` and pixels with ``white <= dark`` set to transmission 1.

Simulated data: a CT volume (HU) becomes attenuation
``mu = MU_WATER (1 + HU / 1000)`` (clipped at 0; ``MU_WATER`` = water at about
70 keV), then is forward-projected with the voxel projector, with optional
Poisson noise at ``I0`` photons per unattenuated detector pixel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..xray.geometry import ConeBeam, GeometryError, ParallelBeam, check_geometry

FORMAT = "medgmae-projections/1"
MU_WATER = 0.0192          # 1/mm, water at ~70 keV
MIN_TRANSMISSION = 1e-4    # clamp before -log: line integrals stay <= 9.2
NPZ_SUFFIXES = (".npz",)
H5_SUFFIXES = (".h5", ".hdf5", ".hdf")


@dataclass
class ProjectionData:
    """Measured (or simulated) line integrals with everything needed to reconstruct them."""

    projections: torch.Tensor                 # [V, rows, cols] float32
    geometry: ParallelBeam | ConeBeam
    volume_shape: tuple[int, int, int]        # reconstruction grid (D, H, W)
    reference: torch.Tensor | None = None     # [D, H, W] ground truth, same units
    affine: np.ndarray | None = None          # 4x4 ijk -> RAS of the grid
    mu_water: float | None = None             # 1/mm; None when the units are unknown
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.projections = torch.as_tensor(self.projections, dtype=torch.float32)
        self.volume_shape = tuple(int(n) for n in self.volume_shape)
        if self.reference is not None:
            self.reference = torch.as_tensor(self.reference, dtype=torch.float32)
        self.validate()

    def validate(self, *, allow_truncation: bool | None = None) -> "ProjectionData":
        where = f" ({self.source})" if self.source else ""
        check_geometry(self.geometry)
        if self.projections.dim() != 3:
            raise GeometryError(f"projections{where} must be [V, rows, cols], got shape {list(self.projections.shape)}")
        if not bool(torch.isfinite(self.projections).all()):
            raise ValueError(f"projections{where} contain NaN or inf")
        if len(self.volume_shape) != 3 or min(self.volume_shape) < 2:
            raise GeometryError(f"volume_shape{where} must be three sizes >= 2, got {self.volume_shape}")
        trunc = self.meta.get("truncated", False) if allow_truncation is None else allow_truncation
        try:
            self.geometry.validate(self.volume_shape, self.projections, allow_truncation=trunc)
        except GeometryError as exc:
            raise GeometryError(f"{exc}{where}") from None
        if self.reference is not None and tuple(self.reference.shape) != self.volume_shape:
            raise ValueError(f"reference{where} has shape {list(self.reference.shape)} but volume_shape is "
                             f"{list(self.volume_shape)}")
        if self.affine is not None:
            self.affine = np.asarray(self.affine, dtype=np.float64)
            if self.affine.shape != (4, 4):
                raise ValueError(f"affine{where} must be 4x4, got shape {self.affine.shape}")
        return self

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return tuple(e / (n - 1) for e, n in zip(self.geometry.volume_extent_mm, self.volume_shape))

    def grid_affine(self) -> np.ndarray:
        """ijk-to-RAS of the reconstruction grid: the stored affine, else axis-aligned, centred on the origin."""
        if self.affine is not None:
            return self.affine
        a = np.diag([*self.spacing_mm, 1.0])
        a[:3, 3] = [-0.5 * e for e in self.geometry.volume_extent_mm]
        return a


# ----------------------------------------------------------------- geometry
def geometry_attributes(geometry) -> dict:
    """The format's geometry fields (without ``angles``) of a ParallelBeam/ConeBeam."""
    g = check_geometry(geometry)
    attrs = {"geometry": g.kind, "detector_spacing": list(g.detector_spacing),
             "detector_offset": g.detector_offset, "volume_extent_mm": list(g.volume_extent_mm)}
    if isinstance(g, ConeBeam):
        attrs.update(source_to_origin=g.source_to_origin, source_to_detector=g.source_to_detector)
    return attrs


def geometry_from_attributes(attrs: dict, angles, detector_shape, source: str = "") -> ParallelBeam | ConeBeam:
    where = f"{source}: " if source else ""
    kind = str(attrs.get("geometry", "")).lower()
    missing = [k for k in ("detector_spacing", "volume_extent_mm") if k not in attrs]
    if kind not in ("parallel", "cone"):
        raise GeometryError(f"{where}geometry must be 'parallel' or 'cone', got {attrs.get('geometry')!r}")
    if kind == "cone":
        missing += [k for k in ("source_to_origin", "source_to_detector") if k not in attrs]
    if missing:
        raise GeometryError(f"{where}missing geometry field(s) {missing}")
    common = dict(angles=angles, detector_shape=detector_shape,
                  detector_spacing=[float(x) for x in np.atleast_1d(attrs["detector_spacing"])],
                  volume_extent_mm=[float(x) for x in np.atleast_1d(attrs["volume_extent_mm"])],
                  detector_offset=float(attrs.get("detector_offset", 0.0)))
    try:
        if kind == "parallel":
            return ParallelBeam(**common)
        return ConeBeam(**common, source_to_origin=float(attrs["source_to_origin"]),
                        source_to_detector=float(attrs["source_to_detector"]))
    except GeometryError as exc:
        raise GeometryError(f"{where}{exc}") from None


# ---------------------------------------------------------------- save/load
def _suffix_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(NPZ_SUFFIXES):
        return "npz"
    if name.endswith(H5_SUFFIXES):
        return "h5"
    raise ValueError(f"{path}: unknown projection file type; use .npz or .h5/.hdf5")


def check_angles_radians(angles: np.ndarray, what: str = "angles") -> None:
    """Refuse projection angles that cannot be this format's radians: NaN/inf, all equal (more than one view),
    or spanning more than a full turn (degrees, like the data-exchange ``theta``)."""
    a = np.asarray(angles, dtype=np.float64).reshape(-1)
    if not np.isfinite(a).all():
        raise GeometryError(f"{what} contain NaN or inf")
    if a.size > 1 and float(a.max() - a.min()) < 1e-9:
        raise GeometryError(f"{what}: all {a.size} angles are {a[0]:g}; the views of a scan need different angles")
    if float(a.max() - a.min()) > 2 * math.pi + 1e-6:
        raise GeometryError(f"{what} span {float(a.max() - a.min()):.4g}: angles in this format are radians, these "
                            "look like degrees (convert them with numpy.deg2rad)")


def save_projections(path: str | Path, data: ProjectionData) -> Path:
    """Write ``data`` in the ``medgmae-projections/1`` format (npz or HDF5 by suffix), atomically."""
    path = Path(path)
    kind = _suffix_kind(path)
    attrs = {"format": FORMAT, **geometry_attributes(data.geometry), "volume_shape": list(data.volume_shape)}
    if data.mu_water is not None:
        attrs["mu_water"] = float(data.mu_water)
    arrays = {"projections": data.projections.cpu().numpy().astype(np.float32),
              "angles": data.geometry.angles.cpu().numpy().astype(np.float64)}
    if data.reference is not None:
        arrays["reference"] = data.reference.cpu().numpy().astype(np.float32)
    if data.affine is not None:
        arrays["affine"] = np.asarray(data.affine, dtype=np.float64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if kind == "npz":
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays, **{k: np.asarray(v) for k, v in attrs.items()})
    else:
        import h5py

        with h5py.File(tmp, "w") as f:
            for k, v in arrays.items():
                f.create_dataset(k, data=v, compression="gzip" if v.ndim >= 2 else None)
            for k, v in attrs.items():
                f.attrs[k] = v
    tmp.replace(path)
    return path


def _scalar(v):
    v = np.asarray(v)
    if v.dtype.kind in "SUO" and v.ndim == 0:
        item = v.item()
        return item.decode() if isinstance(item, bytes) else str(item)
    return v.item() if v.ndim == 0 else v


def load_projections(path: str | Path, **data_exchange_options) -> ProjectionData:
    """Read a ``medgmae-projections/1`` file (npz/HDF5) or an APS data-exchange HDF5 scan.

    ``data_exchange_options`` go to :func:`load_data_exchange` when the file is one.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"projection file not found: {path}")
    kind = _suffix_kind(path)
    try:
        if kind == "npz":
            with np.load(path, allow_pickle=False) as z:
                contents = {k: z[k] for k in z.files}
            arrays = {k: contents.pop(k) for k in ("projections", "angles", "reference", "affine") if k in contents}
            attrs = {k: _scalar(v) for k, v in contents.items()}
        else:
            import h5py

            with h5py.File(path, "r") as f:
                if "exchange" in f and "data" in f["exchange"]:
                    is_exchange = True
                else:
                    is_exchange = False
                    arrays = {k: f[k][...] for k in ("projections", "angles", "reference", "affine") if k in f}
                    attrs = {k: _scalar(v) for k, v in f.attrs.items()}
            if is_exchange:
                return load_data_exchange(path, **data_exchange_options)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}: cannot read projection file ({type(exc).__name__}: {exc})") from None
    if data_exchange_options:
        raise ValueError(f"{path}: options {sorted(data_exchange_options)} only apply to data-exchange scans")
    if attrs.get("format") not in (FORMAT, None):
        raise ValueError(f"{path}: format is {attrs.get('format')!r}, expected {FORMAT!r}")
    for key in ("projections", "angles"):
        if key not in arrays:
            raise ValueError(f"{path}: missing '{key}' (a {FORMAT} file needs projections [V, rows, cols] and angles [V])")
    proj = np.asarray(arrays["projections"], dtype=np.float32)
    if proj.ndim != 3:
        raise GeometryError(f"{path}: projections must be [V, rows, cols], got shape {list(proj.shape)}")
    angles = np.asarray(arrays["angles"], dtype=np.float64).reshape(-1)
    if angles.size != proj.shape[0]:
        raise GeometryError(f"{path}: {angles.size} angles but {proj.shape[0]} projections: angles must match "
                            f"projections one to one")
    check_angles_radians(angles, f"{path}: angles")
    if "volume_shape" not in attrs:
        raise GeometryError(f"{path}: missing geometry field 'volume_shape'")
    geometry = geometry_from_attributes(attrs, angles, proj.shape[1:], source=str(path))
    return ProjectionData(torch.from_numpy(proj), geometry, tuple(int(n) for n in np.atleast_1d(attrs["volume_shape"])),
                         reference=torch.from_numpy(np.asarray(arrays["reference"], np.float32)) if "reference" in arrays else None,
                         affine=arrays.get("affine"), mu_water=attrs.get("mu_water"), source=str(path))


# ------------------------------------------------------------ real scans
def is_data_exchange(path: str | Path) -> bool:
    """True for an HDF5 file with ``exchange/data`` (APS data-exchange)."""
    path = Path(path)
    if not path.name.lower().endswith(H5_SUFFIXES) or not path.exists():
        return False
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return "exchange" in f and "data" in f["exchange"]
    except OSError:
        return False


def normalise_counts(data: np.ndarray, white: np.ndarray, dark: np.ndarray) -> np.ndarray:
    """Raw counts ``[V, rows, cols]`` -> line integrals ``-log((I - dark) / (white - dark))``.

    ``white``/``dark`` may be stacks ``[n, rows, cols]`` (averaged) or single
    frames. The transmission is clamped to ``>= MIN_TRANSMISSION``; detector
    pixels whose flat field is not above the dark field get transmission 1.
    """
    data = np.asarray(data, dtype=np.float64)
    white = np.asarray(white, dtype=np.float64)
    dark = np.asarray(dark, dtype=np.float64)
    white = white.mean(0) if white.ndim == 3 else white
    dark = dark.mean(0) if dark.ndim == 3 else dark
    if white.shape != data.shape[1:] or dark.shape != data.shape[1:]:
        raise ValueError(f"flat {list(white.shape)} / dark {list(dark.shape)} fields do not match the projections' "
                         f"detector {list(data.shape[1:])}")
    gain = white - dark
    ok = gain > 0
    trans = np.where(ok, (data - dark) / np.where(ok, gain, 1.0), 1.0)
    return (-np.log(np.maximum(trans, MIN_TRANSMISSION))).astype(np.float32)


def estimate_rotation_centre(sinogram: np.ndarray, angles: np.ndarray) -> float:
    """Column onto which the rotation axis projects, from the projections' centres of mass.

    For parallel beam the centre of mass of each projection traces
    ``c + a cos(theta) + b sin(theta)``; a linear least-squares fit gives ``c``.
    ``sinogram`` is ``[V, cols]`` or ``[V, rows, cols]`` (rows are summed).
    Needs an object inside the field of view and a background near 0.
    """
    s = np.asarray(sinogram, dtype=np.float64)
    s = s.sum(1) if s.ndim == 3 else s
    mass = np.clip(s, 0, None)
    total = mass.sum(1)
    if np.any(total <= 0):
        raise ValueError("cannot estimate the rotation centre: some projections are empty")
    com = (mass * np.arange(s.shape[1])).sum(1) / total
    a = np.stack([np.ones_like(angles), np.cos(angles), np.sin(angles)], 1)
    return float(np.linalg.lstsq(a, com, rcond=None)[0][0])


def bin_columns(projections: np.ndarray, factor: int) -> np.ndarray:
    """Average groups of ``factor`` detector columns (trailing columns that do not fill a group are dropped)."""
    if factor == 1:
        return projections
    v, r, c = projections.shape
    n = c // factor
    return projections[..., :n * factor].reshape(v, r, n, factor).mean(-1)


def load_data_exchange(path: str | Path, *, centre: float | str | None = "auto", bin_cols: int = 1,
                       pixel_size_mm: float = 1.0, grid_size: int | None = None) -> ProjectionData:
    """An APS data-exchange scan (parallel beam) as ProjectionData.

    ``centre``: the rotation-axis column in the raw detector (e.g. 295.5 for the
    tomopy tooth), ``"auto"``/None to estimate it (:func:`estimate_rotation_centre`).
    ``bin_cols`` averages detector columns (rows are kept). ``pixel_size_mm``
    is the detector pixel pitch (data-exchange files often omit it; units then
    are "pixels" and the attenuation is per pixel). The reconstruction grid is
    in-plane square, ``grid_size`` voxels a side (default: one voxel per binned
    column), inscribed in the disc the detector sees on both sides of the axis;
    along the rotation axis one voxel per detector row.
    """
    import h5py

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data-exchange file not found: {path}")
    if int(bin_cols) < 1:
        raise ValueError(f"bin_cols must be >= 1, got {bin_cols}")
    if not pixel_size_mm > 0:
        raise ValueError(f"pixel_size_mm must be positive, got {pixel_size_mm}")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("data", "data_white", "data_dark", "theta") if k not in f["exchange"]]
            if missing:
                raise ValueError(f"missing exchange/{', exchange/'.join(missing)}")
            data, white, dark = (f["exchange"][k][...] for k in ("data", "data_white", "data_dark"))
            theta = np.asarray(f["exchange"]["theta"][...], dtype=np.float64).reshape(-1)
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable data-exchange scan ({exc})") from None
    if data.ndim != 3 or theta.size != data.shape[0]:
        raise GeometryError(f"{path}: exchange/data has shape {list(data.shape)} but exchange/theta has {theta.size} "
                            "angles; they must match one to one")
    if theta.max() - theta.min() <= 2 * math.pi + 1e-6 and theta.size > 8:
        raise ValueError(f"{path}: exchange/theta spans {theta.max() - theta.min():.3f}: data-exchange angles are in "
                         "degrees, these look like radians")
    angles = np.deg2rad(theta)
    proj = normalise_counts(data, white, dark)  # [V, rows, cols]
    cols = proj.shape[2]
    if centre is None or centre == "auto":
        centre_col = estimate_rotation_centre(proj, angles)
        centre_how = "auto"
    else:
        centre_col = float(centre)
        centre_how = "given"
    if not (0 <= centre_col <= cols - 1):
        raise GeometryError(f"{path}: rotation centre column {centre_col:.1f} lies outside the detector (0..{cols - 1})")
    b = int(bin_cols)
    proj = bin_columns(proj, b)
    centre_b = (centre_col - (b - 1) / 2) / b  # binned column index of the axis
    cols_b = proj.shape[2]
    du = pixel_size_mm * b
    radius = min(centre_b, cols_b - 1 - centre_b) * du  # both detector sides see this far
    n = int(grid_size) if grid_size else int(math.floor(2 * radius / math.sqrt(2) / du)) + 1
    if n < 2:
        raise GeometryError(f"{path}: grid_size must be >= 2, got {n}")
    side = min((n - 1) * du, 2 * radius / math.sqrt(2))
    rows = proj.shape[1]
    geometry = ParallelBeam(angles=angles, detector_shape=(rows, cols_b), detector_spacing=(pixel_size_mm, du),
                            volume_extent_mm=(side, side, (rows - 1) * pixel_size_mm if rows > 1 else pixel_size_mm),
                            detector_offset=centre_b - (cols_b - 1) / 2)
    shape = (n, n, max(rows, 2))
    meta = {"rotation_centre_column": centre_col, "rotation_centre": centre_how, "bin_cols": b,
            "pixel_size_mm": pixel_size_mm,
            "units": f"unknown: attenuation per {pixel_size_mm:g} mm (1/mm only if --pixel-size {pixel_size_mm:g} is "
                     "the detector's true pixel pitch; data-exchange files do not record it)"}
    return ProjectionData(torch.from_numpy(proj), geometry, shape, source=str(path), meta=meta)


# --------------------------------------------------------- simulated scans
def hu_to_mu(hu, mu_water: float = MU_WATER):
    """HU -> linear attenuation (1/mm), clipped at 0 (numpy or torch)."""
    if isinstance(hu, torch.Tensor):
        return (mu_water * (1 + hu / 1000.0)).clamp_min(0.0)
    return np.clip(mu_water * (1 + np.asarray(hu, dtype=np.float64) / 1000.0), 0.0, None)


def mu_to_hu(mu, mu_water: float = MU_WATER):
    return 1000.0 * (mu / mu_water - 1.0)


def parse_crop(text: str | None, shape: Sequence[int]) -> tuple[slice, slice, slice]:
    """``"i0:i1,j0:j1,k0:k1"`` (empty parts = whole axis) -> three slices, checked against ``shape``."""
    if not text:
        return (slice(None),) * 3
    parts = text.split(",")
    if len(parts) != 3:
        raise ValueError(f"--crop must be three ranges 'i0:i1,j0:j1,k0:k1', got {text!r}")
    out = []
    for axis, (part, n) in enumerate(zip(parts, shape)):
        lo, _, hi = part.partition(":")
        try:
            a = int(lo) if lo.strip() else 0
            b = int(hi) if hi.strip() else n
        except ValueError:
            raise ValueError(f"--crop range {part!r} (axis {axis}) must be integers 'start:stop'") from None
        if not (0 <= a < b <= n) or b - a < 2:
            raise ValueError(f"--crop range {part!r} (axis {axis}) must satisfy 0 <= start < stop <= {n} with >= 2 voxels")
        out.append(slice(a, b))
    return tuple(out)


def downsample_volume(volume: np.ndarray, affine: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Block-average by an integer ``factor`` per axis (trailing voxels dropped); the affine follows."""
    if factor == 1:
        return volume, affine
    if factor < 1:
        raise ValueError(f"downsample factor must be >= 1, got {factor}")
    shape = [n // factor for n in volume.shape]
    if min(shape) < 2:
        raise ValueError(f"downsample factor {factor} leaves fewer than 2 voxels on an axis of {list(volume.shape)}")
    v = volume[:shape[0] * factor, :shape[1] * factor, :shape[2] * factor]
    v = v.reshape(shape[0], factor, shape[1], factor, shape[2], factor).mean((1, 3, 5))
    a = np.asarray(affine, dtype=np.float64).copy()
    a[:3, 3] = a[:3, 3] + a[:3, :3] @ np.full(3, (factor - 1) / 2)  # new voxel 0 = centre of the first block
    a[:3, :3] = a[:3, :3] * factor
    return v, a


def load_ct_volume(path: str | Path, *, crop: str | None = None, downsample: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A CT (HU) as a float32 array in RAS index order and its ijk-to-RAS affine, cropped then downsampled."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"CT volume not found: {path}")
    from ..data.readers import NIFTI_SUFFIXES, has_suffix, read_ct

    # the one reader every command uses: errors name the file, [X, Y, Z, 1] is 3D, DICOM series are checked
    hu, affine = read_ct(path, what="CT volume", check_ct=False)
    if has_suffix(path, NIFTI_SUFFIXES):  # RAS index order, like nib.as_closest_canonical
        import nibabel as nib

        ornt = nib.orientations.io_orientation(affine)
        affine = affine @ nib.orientations.inv_ornt_aff(ornt, hu.shape)
        hu = np.ascontiguousarray(nib.orientations.apply_orientation(hu, ornt), dtype=np.float32)
    sl = parse_crop(crop, hu.shape)
    hu = hu[sl]
    affine = np.asarray(affine, dtype=np.float64).copy()
    affine[:3, 3] = affine[:3, 3] + affine[:3, :3] @ np.array([s.start or 0 for s in sl], dtype=np.float64)
    return downsample_volume(hu, affine, int(downsample))


def add_poisson_noise(projections: torch.Tensor, i0: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Line integrals -> noisy line integrals: counts ~ Poisson(I0 exp(-p)), zero counts read as 0.5."""
    if not i0 > 0:
        raise ValueError(f"noise photon count I0 must be positive, got {i0}")
    expected = float(i0) * torch.exp(-projections.double())
    counts = torch.poisson(expected, generator=generator).clamp_min(0.5)
    return (-torch.log(counts / float(i0))).to(projections.dtype)


def simulate_scan(mu: torch.Tensor | np.ndarray, spacing_mm: Sequence[float], *, geometry: str = "parallel",
                  views: int = 120, noise_i0: float | None = None, seed: int = 0, affine: np.ndarray | None = None,
                  source: str = "", mu_water: float | None = MU_WATER, **geometry_options) -> ProjectionData:
    """Forward-project an attenuation volume ``[D, H, W]`` (1/mm) with the voxel projector.

    ``geometry``: ``"parallel"`` (views over 180 degrees) or ``"cone"`` (over
    360 degrees); ``geometry_options`` go to ``ParallelBeam.for_volume`` /
    ``ConeBeam.for_volume`` (e.g. ``source_to_origin``, ``source_to_detector``).
    """
    from ..xray.voxel_projector import project_volume

    vol = torch.as_tensor(np.asarray(mu, dtype=np.float32) if not isinstance(mu, torch.Tensor) else mu).float()
    if vol.dim() != 3:
        raise ValueError(f"volume must be [D, H, W], got shape {list(vol.shape)}")
    if int(views) < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    shape = tuple(vol.shape)
    if geometry == "parallel":
        geom = ParallelBeam.for_volume(shape, spacing_mm, int(views), **geometry_options)
    elif geometry == "cone":
        geom = ConeBeam.for_volume(shape, spacing_mm, int(views), **geometry_options)
    else:
        raise ValueError(f"geometry must be 'parallel' or 'cone', got {geometry!r}")
    geom.validate(shape)
    proj = project_volume(vol[None], geom)[0]  # [V, rows, cols]
    meta = {"simulated": True, "noise_i0": noise_i0, "views": int(views)}
    if noise_i0:
        proj = add_poisson_noise(proj, noise_i0, torch.Generator().manual_seed(int(seed)))
    return ProjectionData(proj, geom, shape, reference=vol, affine=affine, mu_water=mu_water, source=source, meta=meta)


def simulate_from_ct(path: str | Path, *, crop: str | None = None, downsample: int = 1, **options) -> ProjectionData:
    """Read a CT (HU), convert to attenuation and :func:`simulate_scan` it."""
    from ..spatial import spacing_of

    hu, affine = load_ct_volume(path, crop=crop, downsample=downsample)
    mu = hu_to_mu(hu).astype(np.float32)
    return simulate_scan(mu, tuple(spacing_of(affine)), affine=affine, source=str(path), **options)


__all__ = ["ProjectionData", "FORMAT", "MU_WATER", "save_projections", "load_projections", "load_data_exchange",
           "normalise_counts", "is_data_exchange", "estimate_rotation_centre", "bin_columns", "simulate_scan", "simulate_from_ct",
           "load_ct_volume", "hu_to_mu", "mu_to_hu", "add_poisson_noise", "geometry_attributes",
           "geometry_from_attributes", "parse_crop", "downsample_volume"]
