"""``ProjectionData``: measured (or simulated) line integrals with the geometry and grid to reconstruct them.

The one in-memory form of a scan, whatever it came from: a ``medgmae-projections/1`` file
(:mod:`.projection_file`), an APS Data Exchange HDF5 scan (:mod:`.data_exchange`) or a scan simulated from a CT
(:mod:`.simulation`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..xray.geometry import ConeBeam, GeometryError, ParallelBeam, check_geometry

NPZ_SUFFIXES = (".npz",)
H5_SUFFIXES = (".h5", ".hdf5", ".hdf")  # HDF5: the projection file format and Data Exchange scans


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


__all__ = ["ProjectionData", "NPZ_SUFFIXES", "H5_SUFFIXES"]
