"""The projection file format ``medgmae-projections/1`` (``.npz`` or ``.h5``/``.hdf5``): :func:`save_projections`
and :func:`load_projections` (which also reads an APS Data Exchange scan, see :mod:`.data_exchange`).

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
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..xray.geometry import ConeBeam, GeometryError, ParallelBeam, check_geometry
from .data_exchange import load_data_exchange
from .projection_data import H5_SUFFIXES, NPZ_SUFFIXES, ProjectionData

FORMAT = "medgmae-projections/1"


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
        import h5py  # lazy: heavy, needed only for HDF5 files

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
            import h5py  # lazy: heavy, needed only for HDF5 files

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


__all__ = ["FORMAT", "save_projections", "load_projections", "check_angles_radians", "geometry_attributes",
           "geometry_from_attributes"]
