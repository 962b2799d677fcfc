"""X-ray geometry and projectors: Gaussians or voxels -> projections, and back (FBP/FDK)."""
from .geometry import ConeBeam, GeometryError, ParallelBeam, check_geometry, evenly_spaced_angles
from .voxel_projector import backproject, project_volume

__all__ = ["ParallelBeam", "ConeBeam", "GeometryError", "check_geometry", "evenly_spaced_angles",
           "project_volume", "backproject"]
