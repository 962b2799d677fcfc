"""Scan geometries: where the source, the detector and the volume sit, in millimetres.

Frame (all in mm, volume axes D, H, W = x0, x1, x2):

* The volume ``[0,1]^3`` (voxel ``i`` of ``N`` at ``i/(N-1)``) maps to
  ``x_a = (u_a - 0.5) * volume_extent_mm[a]``: centred on the rotation axis.
  ``volume_extent_mm[a] = (N_a - 1) * spacing_a`` spans the voxel centres.
* The rotation axis is volume axis 2 (W). At angle ``theta`` the central ray
  points along ``r = (cos theta, sin theta, 0)``; detector columns run along
  ``e_u = (-sin theta, cos theta, 0)`` and detector rows along ``e_v = (0, 0, 1)``.
* Detector pixel ``(row i, col j)`` has coordinates
  ``u_j = (j - (cols-1)/2 - detector_offset) * du`` and ``v_i = (i - (rows-1)/2) * dv``:
  ``detector_offset`` (in columns) moves the column the rotation axis projects to,
  e.g. -24 for an axis at column 295.5 of 640.
* Parallel beam: the ray through pixel (u, v) is ``u e_u + v e_v + t r``.
  Cone beam (flat detector, circular orbit): the source is at ``-SOD r``, the
  detector plane at ``(SDD - SOD) r``, and the ray runs from the source to
  ``(SDD - SOD) r + u e_u + v e_v``.

Example, the real tooth scan in ``../shared/data/ct/tomography`` (181 views over
180 deg, 2 rows x 640 columns, axis near column 295.5): after
``-log((I - dark) / (white - dark))``, ``fbp(proj, ParallelBeam(np.deg2rad(theta),
(2, 640), (1.0, 1.0), (415.0, 415.0, 1.0), detector_offset=-24.0), (416, 416, 2))``
gives a sharp tooth cross-section (units: detector pixels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch


class GeometryError(ValueError):
    """A scan geometry is malformed or does not fit the volume; the message names the parameter."""


def _as_angles(angles) -> torch.Tensor:
    try:
        a = torch.as_tensor(np.asarray(angles, dtype=np.float64)).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise GeometryError(f"angles must be a 1-D sequence of radians, got {angles!r}") from exc
    if a.numel() == 0:
        raise GeometryError("angles must contain at least one view")
    if not bool(torch.isfinite(a).all()):
        bad = int((~torch.isfinite(a)).nonzero()[0])
        raise GeometryError(f"angles must be finite radians; angles[{bad}] is {float(a[bad])}")
    return a


def _pair(name: str, value, cast) -> tuple:
    try:
        out = tuple(cast(v) for v in value)
    except TypeError:
        out = (cast(value), cast(value))
    if len(out) != 2:
        raise GeometryError(f"{name} must be two numbers (rows, cols), got {value!r}")
    return out


def _triple(name: str, value) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except TypeError:
        out = (float(value),) * 3
    if len(out) != 3:
        raise GeometryError(f"{name} must be three numbers (D, H, W), got {value!r}")
    return out


def _distance(name: str, value) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise GeometryError(f"{name} must be a positive distance in mm, got {value}")
    return value


def evenly_spaced_angles(n_views: int, angle_range: float) -> np.ndarray:
    """``n_views`` angles over ``[0, angle_range)`` (radians), endpoint excluded."""
    if int(n_views) < 1:
        raise GeometryError(f"n_views must be >= 1, got {n_views}")
    return np.linspace(0.0, float(angle_range), int(n_views), endpoint=False)


def extent_for(shape: Sequence[int], spacing_mm) -> tuple[float, float, float]:
    """``volume_extent_mm`` of a ``(D, H, W)`` grid: ``(N_a - 1) * spacing_a``."""
    spacing = _triple("spacing_mm", spacing_mm)
    return tuple((int(n) - 1) * s for n, s in zip(shape, spacing))


@dataclass(frozen=True, eq=False)
class _Geometry:
    """Fields shared by both beams. ``angles`` is stored as float64 ``[V]``."""

    angles: torch.Tensor
    detector_shape: tuple[int, int]        # (rows, cols)
    detector_spacing: tuple[float, float]  # (dv, du) mm
    volume_extent_mm: tuple[float, float, float]
    detector_offset: float = 0.0           # columns; axis projects to (cols-1)/2 + offset

    def __post_init__(self) -> None:
        object.__setattr__(self, "angles", _as_angles(self.angles))
        object.__setattr__(self, "detector_shape", _pair("detector_shape", self.detector_shape, int))
        object.__setattr__(self, "detector_spacing", _pair("detector_spacing", self.detector_spacing, float))
        object.__setattr__(self, "volume_extent_mm", _triple("volume_extent_mm", self.volume_extent_mm))
        object.__setattr__(self, "detector_offset", float(self.detector_offset))
        self._check_fields()

    # ----------------------------------------------------------------- checks
    def _check_fields(self) -> None:
        rows, cols = self.detector_shape
        if rows < 1 or cols < 1:
            raise GeometryError(f"detector_shape must be positive (rows, cols), got {self.detector_shape}")
        if not all(math.isfinite(s) and s > 0 for s in self.detector_spacing):
            raise GeometryError(f"detector_spacing must be positive mm (dv, du), got {self.detector_spacing}")
        if not all(math.isfinite(e) and e > 0 for e in self.volume_extent_mm):
            raise GeometryError(f"volume_extent_mm must be positive mm (D, H, W), got {self.volume_extent_mm}")
        if not math.isfinite(self.detector_offset):
            raise GeometryError(f"detector_offset must be finite, got {self.detector_offset}")

    def validate(self, volume_shape: Sequence[int] | None = None, projections: torch.Tensor | None = None,
                 *, allow_truncation: bool = False) -> "_Geometry":
        """Raise ``GeometryError`` if the geometry cannot image the volume or match ``projections``.

        ``projections`` may be ``[V, rows, cols]`` or ``[B, V, rows, cols]``.
        ``allow_truncation`` skips the detector-coverage check (for real, truncated scans).
        """
        if volume_shape is not None:
            shape = tuple(int(n) for n in volume_shape)
            if len(shape) != 3 or min(shape) < 2:
                raise GeometryError(f"volume_shape must be three sizes (D, H, W), each >= 2, got {tuple(volume_shape)}")
        if projections is not None:
            self.check_projections(projections)
        if not allow_truncation:
            self._check_coverage()
        return self

    def check_projections(self, projections: torch.Tensor) -> None:
        shape = tuple(projections.shape)
        if len(shape) not in (3, 4):
            raise GeometryError(f"projections must be [V, rows, cols] or [B, V, rows, cols], got shape {list(shape)}")
        if shape[-3] != self.n_views:
            raise GeometryError(f"angles has {self.n_views} views but projections has {shape[-3]} (shape {list(shape)})")
        if shape[-2:] != self.detector_shape:
            raise GeometryError(f"detector_shape is {self.detector_shape} (rows, cols) but projections are "
                                f"{shape[-2:]} (shape {list(shape)})")

    def _check_coverage(self) -> None:
        (u_lo, u_hi), (v_lo, v_hi) = self.volume_footprint_mm()
        (du_lo, du_hi), (dv_lo, dv_hi) = self.detector_bounds_mm()
        tol_u, tol_v = 0.5 * self.detector_spacing[1], 0.5 * self.detector_spacing[0]
        if u_lo < du_lo - tol_u or u_hi > du_hi + tol_u:
            raise GeometryError(
                f"detector_shape/detector_spacing too small for the volume: columns cover u in [{du_lo:.1f}, {du_hi:.1f}] mm "
                f"but the volume projects to [{u_lo:.1f}, {u_hi:.1f}] mm (cols={self.cols}, du={self.detector_spacing[1]}, "
                f"detector_offset={self.detector_offset})")
        if v_lo < dv_lo - tol_v or v_hi > dv_hi + tol_v:
            raise GeometryError(
                f"detector_shape/detector_spacing too small for the volume: rows cover v in [{dv_lo:.1f}, {dv_hi:.1f}] mm "
                f"but the volume projects to [{v_lo:.1f}, {v_hi:.1f}] mm (rows={self.rows}, dv={self.detector_spacing[0]})")

    # ------------------------------------------------------------- properties
    @property
    def n_views(self) -> int:
        return int(self.angles.numel())

    @property
    def rows(self) -> int:
        return self.detector_shape[0]

    @property
    def cols(self) -> int:
        return self.detector_shape[1]

    @property
    def axis_column(self) -> float:
        """Column index (fractional) onto which the rotation axis projects."""
        return (self.cols - 1) / 2.0 + self.detector_offset

    @property
    def centre_row(self) -> float:
        return (self.rows - 1) / 2.0

    def detector_bounds_mm(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """((u_min, u_max), (v_min, v_max)) of the pixel centres, in detector mm."""
        dv, du = self.detector_spacing
        u = ((0 - self.axis_column) * du, (self.cols - 1 - self.axis_column) * du)
        v = (-self.centre_row * dv, self.centre_row * dv)
        return u, v

    def column_coords(self, dtype=torch.float32, device=None) -> torch.Tensor:
        """``[cols]`` detector u of each column centre (mm)."""
        j = torch.arange(self.cols, dtype=dtype, device=device)
        return (j - self.axis_column) * self.detector_spacing[1]

    def row_coords(self, dtype=torch.float32, device=None) -> torch.Tensor:
        """``[rows]`` detector v of each row centre (mm)."""
        i = torch.arange(self.rows, dtype=dtype, device=device)
        return (i - self.centre_row) * self.detector_spacing[0]

    def view_frames(self, dtype=torch.float32, device=None, views: slice | None = None):
        """Per-view unit vectors ``(r, e_u)``, each ``[V, 3]``; ``e_v`` is (0, 0, 1)."""
        a = self.angles if views is None else self.angles[views]
        a = a.to(device=device, dtype=torch.float64)
        zero = torch.zeros_like(a)
        r = torch.stack([torch.cos(a), torch.sin(a), zero], -1)
        e_u = torch.stack([-torch.sin(a), torch.cos(a), zero], -1)
        return r.to(dtype), e_u.to(dtype)

    # --------------------------------------------------------- volume mapping
    def extent_tensor(self, dtype=torch.float32, device=None) -> torch.Tensor:
        return torch.tensor(self.volume_extent_mm, dtype=dtype, device=device)

    def to_mm(self, points: torch.Tensor) -> torch.Tensor:
        """Normalised volume coordinates ``[..., 3]`` in [0,1] -> mm ``[..., 3]``."""
        return (points - 0.5) * self.extent_tensor(points.dtype, points.device)

    def from_mm(self, points_mm: torch.Tensor) -> torch.Tensor:
        """mm ``[..., 3]`` -> normalised volume coordinates ``[..., 3]``."""
        return points_mm / self.extent_tensor(points_mm.dtype, points_mm.device) + 0.5

    def volume_corners_mm(self) -> torch.Tensor:
        """``[8, 3]`` float64 corners of the volume box."""
        half = torch.tensor(self.volume_extent_mm, dtype=torch.float64) / 2
        signs = torch.tensor([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=torch.float64)
        return signs * half

    def inplane_radius_mm(self) -> float:
        """Distance from the rotation axis to the farthest volume corner."""
        d, h, _ = self.volume_extent_mm
        return 0.5 * math.hypot(d, h)

    def volume_footprint_mm(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """Detector ((u_min, u_max), (v_min, v_max)) covered by the volume box over all views."""
        u, v = self.project_points_mm(self.volume_corners_mm())  # [V, 8] each
        return (float(u.min()), float(u.max())), (float(v.min()), float(v.max()))

    def project_points_mm(self, points_mm: torch.Tensor):
        raise NotImplementedError

    def copy_with(self, **changes) -> "_Geometry":
        """A new geometry with some fields replaced (e.g. a subset of angles)."""
        kwargs = {f: getattr(self, f) for f in self.__dataclass_fields__}
        kwargs.update(changes)
        return type(self)(**kwargs)


@dataclass(frozen=True, eq=False)
class ParallelBeam(_Geometry):
    """Parallel-beam scan around volume axis 2 (see the module docstring for the frame)."""

    kind = "parallel"

    def project_points_mm(self, points_mm: torch.Tensor):
        """Points ``[N, 3]`` (mm) -> detector ``(u, v)``, each ``[V, N]`` (mm)."""
        r, e_u = self.view_frames(points_mm.dtype, points_mm.device)
        u = e_u @ points_mm.T  # [V, N]
        v = points_mm[:, 2].expand_as(u)
        return u, v

    @classmethod
    def for_volume(cls, shape: Sequence[int], spacing_mm, n_views: int, *, angle_range: float = math.pi,
                   detector_spacing=None, detector_offset: float = 0.0, margin: int = 1) -> "ParallelBeam":
        """A detector just covering a ``(D, H, W)`` volume with ``spacing_mm``, over ``n_views`` angles.

        Default detector spacing = the in-plane voxel spacing (columns) and the
        axis-2 voxel spacing (rows, which then sit on the slices). ``margin``
        extra columns on each side.
        """
        extent = extent_for(shape, spacing_mm)
        sp = _triple("spacing_mm", spacing_mm)
        dv, du = _pair("detector_spacing", detector_spacing, float) if detector_spacing is not None else (sp[2], min(sp[0], sp[1]))
        radius = 0.5 * math.hypot(extent[0], extent[1])
        half_cols = math.ceil(radius / du + abs(detector_offset)) + margin
        rows = int(math.ceil(extent[2] / dv - 1e-9)) + 1  # rays never leave their row: no row margin needed
        return cls(angles=evenly_spaced_angles(n_views, angle_range), detector_shape=(rows, 2 * half_cols + 1),
                   detector_spacing=(dv, du), volume_extent_mm=extent, detector_offset=detector_offset)


@dataclass(frozen=True, eq=False)
class ConeBeam(_Geometry):
    """Circular-orbit cone beam with a flat detector (see the module docstring for the frame)."""

    source_to_origin: float = field(default=0.0, kw_only=True)    # SOD, mm
    source_to_detector: float = field(default=0.0, kw_only=True)  # SDD, mm

    kind = "cone"

    def _check_fields(self) -> None:
        super()._check_fields()
        for name in ("source_to_origin", "source_to_detector"):
            object.__setattr__(self, name, _distance(name, getattr(self, name)))
        if self.source_to_detector <= self.source_to_origin:
            raise GeometryError(f"source_to_detector ({self.source_to_detector} mm) must exceed source_to_origin "
                                f"({self.source_to_origin} mm): the detector lies beyond the rotation axis")

    def validate(self, volume_shape=None, projections=None, *, allow_truncation: bool = False) -> "ConeBeam":
        radius = self.inplane_radius_mm()
        if self.source_to_origin <= radius:
            raise GeometryError(f"source_to_origin ({self.source_to_origin} mm) puts the source inside the volume: "
                                f"the volume reaches {radius:.1f} mm from the rotation axis (volume_extent_mm="
                                f"{self.volume_extent_mm})")
        super().validate(volume_shape, projections, allow_truncation=allow_truncation)
        return self

    @property
    def magnification(self) -> float:
        return self.source_to_detector / self.source_to_origin

    def project_points_mm(self, points_mm: torch.Tensor):
        """Points ``[N, 3]`` (mm) -> perspective detector ``(u, v)``, each ``[V, N]`` (mm)."""
        r, e_u = self.view_frames(points_mm.dtype, points_mm.device)
        depth = self.source_to_origin + r @ points_mm.T  # [V, N] distance along the central ray
        u = self.source_to_detector * (e_u @ points_mm.T) / depth
        v = self.source_to_detector * points_mm[:, 2] / depth
        return u, v

    @classmethod
    def for_volume(cls, shape: Sequence[int], spacing_mm, n_views: int, *, source_to_origin: float | None = None,
                   source_to_detector: float | None = None, angle_range: float = 2 * math.pi,
                   detector_spacing=None, detector_offset: float = 0.0, margin: int = 1) -> "ConeBeam":
        """A flat detector covering the volume's cone-beam shadow over all views.

        Defaults: SOD = 3x the in-plane radius, SDD = 2 SOD, detector spacing =
        voxel spacing times the magnification.
        """
        extent = extent_for(shape, spacing_mm)
        sp = _triple("spacing_mm", spacing_mm)
        radius = 0.5 * math.hypot(extent[0], extent[1])
        sod = _distance("source_to_origin", source_to_origin) if source_to_origin is not None else 3.0 * max(radius, 1e-6)
        sdd = _distance("source_to_detector", source_to_detector) if source_to_detector is not None else 2.0 * sod
        mag = sdd / sod
        dv, du = (_pair("detector_spacing", detector_spacing, float) if detector_spacing is not None
                  else (sp[2] * mag, min(sp[0], sp[1]) * mag))
        angles = evenly_spaced_angles(n_views, angle_range)
        probe = cls(angles=angles, detector_shape=(1, 1), detector_spacing=(dv, du), volume_extent_mm=extent,
                    source_to_origin=sod, source_to_detector=sdd)
        (u_lo, u_hi), (v_lo, v_hi) = probe.volume_footprint_mm()
        half_cols = math.ceil(max(-u_lo, u_hi) / du + abs(detector_offset)) + margin
        half_rows = math.ceil(max(-v_lo, v_hi) / dv - 1e-9) + margin
        return cls(angles=angles, detector_shape=(2 * half_rows + 1, 2 * half_cols + 1), detector_spacing=(dv, du),
                   volume_extent_mm=extent, detector_offset=detector_offset, source_to_origin=sod,
                   source_to_detector=sdd)


Geometry = ParallelBeam | ConeBeam


def check_geometry(geometry) -> _Geometry:
    if not isinstance(geometry, (ParallelBeam, ConeBeam)):
        raise GeometryError(f"geometry must be a ParallelBeam or ConeBeam, got {type(geometry).__name__}")
    return geometry
