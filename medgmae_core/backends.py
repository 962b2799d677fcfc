"""Which backend runs a Gaussian kernel: one rule for the renderer (``render``) and the X-ray projector
(``xray.gaussian_projector``).

Both offer the same backends: ``"numba"`` (CPU tensors only; numba must import and not be disabled by
``MEDGMAE_DISABLE_NUMBA``), ``"torch"`` (any device, the CUDA path), ``"reference"`` (dense, slow, obviously
right) and ``"auto"``: numba for CPU tensors when numba is available, torch otherwise. Two things differ between
the callers and are parameters of :func:`resolve_backend`: an environment variable that may override ``"auto"``
(the renderer's ``MEDGMAE_RENDER_BACKEND``; the projector has none), and the exception raised when ``"numba"`` is
asked for but unusable (the renderer's ``RuntimeError``, the projector's ``ValueError``).
"""
from __future__ import annotations

import os

from .gaussians import GaussianSet
from .numba_support import numba_available, numba_unavailable_reason

BACKENDS = ("auto", "numba", "torch", "reference")


def check_backend_name(backend: str, source: str = "backend") -> str:
    """``backend`` if it is one of :data:`BACKENDS`, else a ``ValueError`` naming ``source``."""
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(gaussians: GaussianSet, backend: str = "auto", *, env_var: str | None = None,
                    unavailable_error: type[Exception] = RuntimeError) -> str:
    """The concrete backend for these Gaussians: ``"numba"``, ``"torch"`` or ``"reference"``.

    ``env_var``: an environment variable whose value (one of :data:`BACKENDS`) replaces ``"auto"``; an explicit
    ``backend`` always wins. ``unavailable_error``: the exception type when ``backend="numba"`` but numba is
    unusable. ``"numba"`` for Gaussians not on the CPU is a ``ValueError``.
    """
    check_backend_name(backend)
    if backend == "auto" and env_var:
        env = os.environ.get(env_var, "").strip()
        if env:
            backend = check_backend_name(env, f"environment variable {env_var}")
    on_cpu = gaussians.device.type == "cpu"
    if backend == "numba":
        if not numba_available():
            raise unavailable_error(f"backend='numba' needs numba, which is unavailable: {numba_unavailable_reason()}")
        if not on_cpu:
            raise ValueError(f"backend='numba' runs on CPU tensors only; these Gaussians are on {gaussians.device}")
        return "numba"
    if backend != "auto":
        return backend
    return "numba" if on_cpu and numba_available() else "torch"


__all__ = ["BACKENDS", "check_backend_name", "resolve_backend"]
