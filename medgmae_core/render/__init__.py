"""Gaussians -> volume. ``render_volume`` picks the fastest available backend.

Backends (all compute the same sum, differentiable w.r.t. centres, scales,
quaternions and intensities; both conventions supported by all of them):

* ``"numba"``: Gaussian-centric CPU kernel (``cpu_kernel.py``), CPU tensors only.
* ``"torch"``: 8^3-tile GEMM-shaped path (``tiles.py``), any device (CUDA unchanged).
* ``"reference"``: dense evaluation of every (Gaussian, voxel) pair (``reference.py``).
* ``"auto"``: numba for CPU tensors when numba imports, torch otherwise (CUDA, or
  no numba). The environment variable ``MEDGMAE_RENDER_BACKEND`` overrides "auto".
"""
from __future__ import annotations

import logging
import math

import torch

from .. import backends
from ..backends import BACKENDS
from ..gaussians import GaussianSet
from .conventions import CONVENTIONS, check_cutoff, check_gaussians, check_shape, get_convention
from .cpu_kernel import render_numba
from .geometry import clip_boxes, render_inputs
from .reference import render_reference
from .tiles import render_tiles

log = logging.getLogger(__name__)

BACKEND_ENV = "MEDGMAE_RENDER_BACKEND"


def resolve_backend(gaussians: GaussianSet, backend: str = "auto") -> str:
    """The concrete backend ``render_volume`` will use for these Gaussians: "numba", "torch" or "reference"
    (``backends.resolve_backend``, with ``MEDGMAE_RENDER_BACKEND`` overriding "auto")."""
    return backends.resolve_backend(gaussians, backend, env_var=BACKEND_ENV, unavailable_error=RuntimeError)


def render_volume(gaussians: GaussianSet, shape, *, cutoff: float | None = 3.0,
                  convention: str = "paper", backend: str = "auto") -> torch.Tensor:
    """Render Gaussians into a ``[B, D, H, W]`` volume over normalised [0,1]^3 coordinates.

    ``cutoff``: ellipsoid radius in sigmas (paper convention; None = no cut-off).
    The release convention ignores it and uses its unrotated +-2s box.
    """
    gaussians = check_gaussians(gaussians)
    shape = check_shape(shape)
    cutoff = check_cutoff(cutoff)
    conv = get_convention(convention)
    name = resolve_backend(gaussians, backend)
    log.info("render_volume: backend=%s (requested %s), convention=%s, B=%d, k=%d, shape=%s",
             name, backend, conv.name, gaussians.batch_size, gaussians.num_gaussians, shape)
    if name == "reference":
        return render_reference(gaussians, shape, cutoff=cutoff, convention=conv)
    radius = math.inf if (cutoff is None or conv.release_box) else float(cutoff)
    centres, precisions, amps = render_inputs(gaussians, conv)
    clip = clip_boxes(gaussians, shape, conv)
    if name == "numba":
        return render_numba(centres, precisions, amps, clip, shape, radius)
    return render_tiles(centres, precisions, amps, clip, shape, radius, clip_is_volume=not conv.release_box)


__all__ = ["render_volume", "render_reference", "resolve_backend", "BACKENDS", "BACKEND_ENV", "CONVENTIONS",
           "get_convention"]
