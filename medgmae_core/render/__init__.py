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
import os

import torch

from ..gaussians import GaussianSet
from ..numba_support import numba_available, numba_unavailable_reason
from .conventions import CONVENTIONS, check_cutoff, check_gaussians, check_shape, get_convention
from .geometry import clip_boxes, render_inputs
from .reference import render_reference

log = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "torch", "numba")
BACKEND_ENV = "MEDGMAE_RENDER_BACKEND"


def _check_backend_name(backend: str, source: str = "backend") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(gaussians: GaussianSet, backend: str = "auto") -> str:
    """The concrete backend ``render_volume`` will use for these Gaussians: "numba", "torch" or "reference"."""
    _check_backend_name(backend)
    if backend == "auto":
        env = os.environ.get(BACKEND_ENV, "").strip()
        if env:
            backend = _check_backend_name(env, f"environment variable {BACKEND_ENV}")
    on_cpu = gaussians.device.type == "cpu"
    if backend == "numba":
        if not numba_available():
            raise RuntimeError(f"backend='numba' needs numba, which is unavailable: {numba_unavailable_reason()}")
        if not on_cpu:
            raise ValueError(f"backend='numba' runs on CPU tensors only; these Gaussians are on {gaussians.device}")
        return "numba"
    if backend != "auto":
        return backend
    return "numba" if on_cpu and numba_available() else "torch"


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
        from .cpu_kernel import render_numba
        return render_numba(centres, precisions, amps, clip, shape, radius)
    from .tiles import render_tiles
    return render_tiles(centres, precisions, amps, clip, shape, radius, clip_is_volume=not conv.release_box)


__all__ = ["render_volume", "render_reference", "resolve_backend", "BACKENDS", "BACKEND_ENV", "CONVENTIONS",
           "get_convention"]
