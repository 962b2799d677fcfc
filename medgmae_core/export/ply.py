"""Gaussians as a 3DGS-style PLY (binary little-endian), written and read with numpy only.

Per vertex (float32): ``x y z`` (centre), ``nx ny nz`` (zeros), ``f_dc_0..2`` (grey SH DC colour of the
intensity: ``(I - 0.5) / C0``), ``opacity`` (``logit(I)``, clipped), ``scale_0..2`` (log of the principal standard
deviations), ``rot_0..3`` (unit quaternion ``w, x, y, z``) and ``intensity`` (MedGMAE's raw intensity).

With an affine (and the grid ``shape``) the file is in world RAS millimetres: positions, scales and rotations
of the Gaussians mapped through ``spatial.gaussians_to_world``; header comments record the grid and the affine
so :func:`read_gaussians_ply` maps them back. Without one, positions and scales are normalised ``[0, 1]^3``.

Reading validates every field before any maths (:func:`check_ply_fields`: finite values, scales within
``SCALE_RANGE`` of the grid, non-zero quaternions, a usable grid/affine), then applies ``GaussianSet``'s own
checks; every problem is one ``ValueError`` naming the file and the first bad vertex.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import spatial
from ..errors import atomic_path
from ..gaussians import GaussianSet, GaussianValidationError

FORMAT_TAG = "medgmae-gaussians/1"
SH_C0 = 0.28209479177387814
FIELDS = ("x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
          "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3", "intensity")
# Scales (standard deviations) a Gaussian may have, relative to the grid's extent (normalised units): outside this
# range a file is damaged, and rendering it would overflow or divide by ~0.
SCALE_RANGE = (1e-7, 1e3)
_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
              "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
              "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}


@dataclass
class PlyGaussians:
    """What a PLY holds: Gaussians (normalised coords of ``shape`` when known) and the world mapping."""

    gaussians: GaussianSet
    coords: str  # "ras" or "normalised"
    shape: tuple[int, int, int] | None
    ijk_to_ras: np.ndarray | None
    comments: list[str]


def write_gaussians_ply(path: str | Path, gaussians: GaussianSet, *, shape=None, ijk_to_ras=None) -> Path:
    """Write one Gaussian set (batch size 1) as PLY; in RAS mm when ``ijk_to_ras`` and ``shape`` are given."""
    if not isinstance(gaussians, GaussianSet):
        raise ValueError(f"gaussians must be a GaussianSet, got {type(gaussians).__name__}")
    if gaussians.batch_size != 1:
        raise ValueError(f"a PLY file holds one Gaussian set; got batch size {gaussians.batch_size} (index it first)")
    gs = gaussians.detach().to("cpu", torch.float64)
    inten = gs.intensities[0].numpy()
    comments = [FORMAT_TAG]
    if ijk_to_ras is not None:
        if shape is None:
            raise ValueError("write_gaussians_ply needs the grid shape along with ijk_to_ras")
        shape = spatial.check_shape(shape)
        affine = spatial.check_affine(ijk_to_ras)
        centres, axes = spatial.gaussians_to_world(gs, shape, affine)
        scales, quats = spatial.world_axes_to_scales_quaternions(axes)
        comments += ["medgmae coords ras", "medgmae shape " + " ".join(str(n) for n in shape),
                     "medgmae ijk_to_ras " + " ".join(repr(float(v)) for v in affine.reshape(-1))]
    else:
        centres, scales, quats = gs.centres[0].numpy(), gs.scales[0].numpy(), gs.unit_quaternions()[0].numpy()
        comments.append("medgmae coords normalised")
        if shape is not None:
            comments.append("medgmae shape " + " ".join(str(n) for n in spatial.check_shape(shape)))
    n = len(inten)
    data = np.zeros(n, dtype=[(name, "<f4") for name in FIELDS])
    for a, name in enumerate("xyz"):
        data[name] = centres[:, a]
    grey = (np.clip(inten, 0.0, 1.0) - 0.5) / SH_C0
    for c in range(3):
        data[f"f_dc_{c}"] = grey
    p = np.clip(inten, 1e-4, 1 - 1e-4)
    data["opacity"] = np.log(p / (1 - p))
    for a in range(3):
        data[f"scale_{a}"] = np.log(scales[:, a])
    for a in range(4):
        data[f"rot_{a}"] = quats[:, a]
    data["intensity"] = inten
    header = ["ply", "format binary_little_endian 1.0", *(f"comment {c}" for c in comments), f"element vertex {n}",
              *(f"property float {name}" for name in FIELDS), "end_header"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(("\n".join(header) + "\n").encode("ascii"))
        fh.write(data.tobytes())
        fh.flush()
        os.fsync(fh.fileno())
    return path


def _parse_header(fh, path) -> tuple[int, np.dtype, list[str]]:
    first = fh.readline().strip()
    if first != b"ply":
        raise ValueError(f"{path}: not a PLY file (first line {first[:20]!r})")
    count, props, comments, fmt, in_vertex = None, [], [], None, False
    while True:
        raw = fh.readline()
        if not raw:
            raise ValueError(f"{path}: PLY header has no end_header")
        line = raw.decode("ascii", errors="replace").strip()
        if line == "end_header":
            break
        words = line.split()
        if not words:
            continue
        if words[0] == "format":
            fmt = words[1]
        elif words[0] == "comment":
            comments.append(line[len("comment "):])
        elif words[0] == "element":
            in_vertex = words[1] == "vertex"
            if in_vertex:
                count = int(words[2])
            elif count is None:
                raise ValueError(f"{path}: element {words[1]!r} before 'vertex' is not supported")
        elif words[0] == "property" and in_vertex:
            if words[1] == "list":
                raise ValueError(f"{path}: list properties on vertices are not supported")
            if words[1] not in _PLY_TYPES:
                raise ValueError(f"{path}: unknown PLY property type {words[1]!r}")
            props.append((words[2], _PLY_TYPES[words[1]]))
    if fmt != "binary_little_endian":
        raise ValueError(f"{path}: only binary_little_endian PLY is supported, got format {fmt!r}")
    if count is None:
        raise ValueError(f"{path}: PLY has no vertex element")
    return count, np.dtype([(name, "<" + t) for name, t in props]), comments


def read_gaussians_ply(path: str | Path, dtype: torch.dtype = torch.float32) -> PlyGaussians:
    """Read a PLY written by :func:`write_gaussians_ply` (or any 3DGS PLY: intensity from ``sigmoid(opacity)``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PLY file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file, not a PLY")
    with open(path, "rb") as fh:
        try:
            count, vdtype, comments = _parse_header(fh, path)
        except (IndexError, UnicodeError) as exc:
            raise ValueError(f"{path}: malformed PLY header ({exc})") from None
        raw = fh.read(count * vdtype.itemsize)
    if len(raw) < count * vdtype.itemsize:
        raise ValueError(f"{path}: truncated PLY ({len(raw)} bytes of vertex data, expected {count * vdtype.itemsize})")
    data = np.frombuffer(raw, dtype=vdtype, count=count)
    missing = [f for f in ("x", "y", "z", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")
               if f not in vdtype.names]
    if missing:
        raise ValueError(f"{path}: PLY lacks Gaussian fields {missing}")
    meta = {}
    for c in comments:
        if c.startswith("medgmae "):
            key, _, value = c[len("medgmae "):].partition(" ")
            meta[key] = value
    if "intensity" not in vdtype.names and "opacity" not in vdtype.names:
        raise ValueError(f"{path}: PLY has neither 'intensity' nor 'opacity'")
    try:
        shape = tuple(int(v) for v in meta["shape"].split()) if "shape" in meta else None
        if shape is not None:
            shape = spatial.check_shape(shape, "shape")
        affine = None
        if "ijk_to_ras" in meta:
            affine = spatial.check_affine(np.array([float(v) for v in meta["ijk_to_ras"].split()]).reshape(4, 4))
    except ValueError as exc:
        raise ValueError(f"{path}: bad grid metadata in the header comments ({exc})") from None
    coords = meta.get("coords", "ras" if "ijk_to_ras" in meta else "normalised")
    world = coords == "ras" and affine is not None and shape is not None
    check_ply_fields(data, path, extent=_world_extent(shape, affine) if world else 1.0)
    col = lambda *names: np.stack([data[n].astype(np.float64) for n in names], axis=-1)  # noqa: E731
    centres, scales = col("x", "y", "z"), np.exp(col("scale_0", "scale_1", "scale_2"))
    quats = col("rot_0", "rot_1", "rot_2", "rot_3")
    if "intensity" in vdtype.names:
        inten = data["intensity"].astype(np.float64)
    else:
        inten = 1.0 / (1.0 + np.exp(-data["opacity"].astype(np.float64)))
    try:
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            if world:
                axes = spatial.world_scales_quaternions_to_axes(scales, quats)
                gs = spatial.world_to_gaussians(centres, axes, inten, shape, affine, dtype=dtype)
            else:
                gs = GaussianSet(*(torch.from_numpy(a)[None] for a in (centres, scales, quats, inten))).to(dtype=dtype)
        gs.validate()  # after the dtype cast too (float32 overflow)
    except (GaussianValidationError, ArithmeticError, np.linalg.LinAlgError, FloatingPointError, RuntimeError) as exc:
        raise ValueError(f"{path}: invalid Gaussians ({type(exc).__name__}: {exc})") from None
    return PlyGaussians(gs, coords, shape, affine, comments)


def _world_extent(shape, affine) -> float:
    """Largest extent (mm) of the grid, the unit the RAS scales are compared with."""
    return float(max(spatial.spacing_of(affine) * (np.asarray(shape) - 1)))


def check_ply_fields(data: np.ndarray, path, extent: float = 1.0) -> None:
    """Refuse damaged Gaussian fields before any maths: NaN/inf anywhere, log-scales outside ``SCALE_RANGE``
    (times ``extent``: 1 for normalised coordinates, the grid's size in mm for RAS), zero quaternions."""
    names = [n for n in FIELDS if n in data.dtype.names and n not in ("nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2")]
    for name in names:
        values = data[name].astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise ValueError(f"{path}: vertex {int(bad[0])} has {name} = {values[bad[0]]} "
                             f"({len(bad)} non-finite value(s) in '{name}')")
    lo, hi = (np.log(SCALE_RANGE[0] * extent), np.log(SCALE_RANGE[1] * extent))
    for name in ("scale_0", "scale_1", "scale_2"):
        values = data[name].astype(np.float64)
        bad = np.flatnonzero((values < lo) | (values > hi))
        if len(bad):
            raise ValueError(f"{path}: vertex {int(bad[0])} has {name} = {values[bad[0]]:.4g} (log of the standard "
                             f"deviation, i.e. {np.exp(min(values[bad[0]], 700.0)):.3g}); scales must lie within "
                             f"{SCALE_RANGE[0] * extent:.3g}..{SCALE_RANGE[1] * extent:.3g} "
                             f"({len(bad)} vertex/vertices out of range)")
    q = np.stack([data[f"rot_{a}"].astype(np.float64) for a in range(4)], axis=-1)
    bad = np.flatnonzero(np.linalg.norm(q, axis=-1) < 1e-12)
    if len(bad):
        raise ValueError(f"{path}: vertex {int(bad[0])} has a zero rotation quaternion ({len(bad)} such vertices)")


__all__ = ["write_gaussians_ply", "read_gaussians_ply", "check_ply_fields", "PlyGaussians", "FIELDS", "SH_C0",
           "FORMAT_TAG", "SCALE_RANGE"]
