"""MedGMAE core: Gaussian masked autoencoders for 3D CT, without Slicer.

Data flows one way: CT -> patches/tokens -> Gaussians -> volume or projections.
"""
from .gaussians import GaussianSet, GaussianValidationError

__version__ = "0.1.0"
__all__ = ["GaussianSet", "GaussianValidationError", "__version__"]
