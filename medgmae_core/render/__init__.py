"""Gaussians -> volume. ``render_volume`` picks the fastest available backend."""
from __future__ import annotations

import logging

import torch

from ..gaussians import GaussianSet
from .conventions import CONVENTIONS, get_convention
from .reference import render_reference

log = logging.getLogger(__name__)

BACKENDS = ("auto", "reference")


def resolve_backend(gaussians: GaussianSet, backend: str = "auto") -> str:
    """The concrete backend ``render_volume`` will use for these Gaussians."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    return "reference"


def render_volume(gaussians: GaussianSet, shape, *, cutoff: float | None = 3.0,
                  convention: str = "paper", backend: str = "auto") -> torch.Tensor:
    """Render Gaussians into a ``[B, D, H, W]`` volume over normalised [0,1]^3 coordinates."""
    name = resolve_backend(gaussians, backend)
    return render_reference(gaussians, shape, cutoff=cutoff, convention=convention)


__all__ = ["render_volume", "render_reference", "resolve_backend", "BACKENDS", "CONVENTIONS", "get_convention"]
