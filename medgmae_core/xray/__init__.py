"""X-ray geometry and projectors: Gaussians or voxels -> projections, and back (FBP/FDK)."""
from .fbp import FILTERS, fbp, fdk, reconstruct_analytic
from .gaussian_projector import project_gaussians
from .gaussian_projector import resolve_backend as resolve_projector_backend
from .geometry import ConeBeam, GeometryError, ParallelBeam, check_geometry, evenly_spaced_angles
from .voxel_projector import backproject, project_volume

__all__ = ["ParallelBeam", "ConeBeam", "GeometryError", "check_geometry", "evenly_spaced_angles",
           "project_gaussians", "resolve_projector_backend", "project_volume", "backproject",
           "fbp", "fdk", "reconstruct_analytic", "FILTERS"]
