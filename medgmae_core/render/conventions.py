"""Renderer conventions: the paper's exact form and the public release's behaviour."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..gaussians import GaussianSet, GaussianValidationError, precision_from


@dataclass(frozen=True)
class Convention:
    name: str
    amplitude: float        # c in V(x) = sum c * I * exp(-0.5 d^T P d)
    conjugate_rotation: bool  # release builds the precision from R^T (conjugated quaternion)
    release_box: bool       # release: its kernel's axis-aligned voxel box from the unrotated scales, no ellipsoid
                            # test: trunc(mu*N -+ 2*s*N) per axis in float32 (geometry.release_boxes)


PAPER = Convention("paper", amplitude=1.0, conjugate_rotation=False, release_box=False)
RELEASE = Convention("release", amplitude=0.1, conjugate_rotation=True, release_box=True)
CONVENTIONS = {c.name: c for c in (PAPER, RELEASE)}
RELEASE_BOX_HALF_WIDTH = 2.0  # the release kernel's "coeff": box half-width 2*s*N voxels from the unrotated scale


def get_convention(convention: str | Convention) -> Convention:
    if isinstance(convention, Convention):
        return convention
    try:
        return CONVENTIONS[convention]
    except KeyError:
        raise ValueError(f"convention must be one of {sorted(CONVENTIONS)}, got {convention!r}") from None


def effective_quaternions(gaussians: GaussianSet, convention: Convention) -> torch.Tensor:
    """The quaternion the renderer actually uses: conjugated for the release convention."""
    q = gaussians.quaternions
    if convention.conjugate_rotation:
        q = q * torch.tensor([1.0, -1.0, -1.0, -1.0], dtype=q.dtype, device=q.device)
    return q


def effective_precisions(gaussians: GaussianSet, convention: Convention) -> torch.Tensor:
    """``[B, k, 3, 3]`` precision matrices in normalised coordinates."""
    return precision_from(gaussians.scales, effective_quaternions(gaussians, convention))


def check_shape(shape) -> tuple[int, int, int]:
    try:
        shape = tuple(int(n) for n in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be three integers (D, H, W), got {shape!r}") from None
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"shape must be three integers (D, H, W), each >= 2, got {shape}")
    return shape


def check_cutoff(cutoff: float | None) -> float | None:
    if cutoff is None:
        return None
    if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float)) or not (cutoff > 0):
        raise ValueError(f"cutoff must be a positive number of sigmas or None, got {cutoff!r}")
    return float(cutoff)


def check_gaussians(gaussians) -> GaussianSet:
    if not isinstance(gaussians, GaussianSet):
        raise GaussianValidationError(f"gaussians must be a GaussianSet, got {type(gaussians).__name__}")
    return gaussians
