"""Our own iterative baseline: SIRT on the voxel projector that simulated the scan (so the forward model
matches the data exactly; RTK's Joseph projector differs from it by ~5% relative L2, enough to make RTK's SART
drift on our data, see ``rtk_baselines.py`` and the benchmark JSON).

SIRT: ``x <- max(0, x + lam * C A^T R (b - A x))`` with ``R = 1 / (A 1)`` (per ray) and ``C = 1 / (A^T 1)``
(per voxel), started from zero, ``A`` = ``medgmae_core.xray.voxel_projector.project_volume`` and ``A^T`` its
exact adjoint ``backproject``.
"""
from __future__ import annotations

import time

import torch


def sirt(projections: torch.Tensor, geometry, shape, *, iterations: int = 50, lam: float = 1.0,
         callback=None) -> tuple[torch.Tensor, float, list]:
    from medgmae_core.xray.voxel_projector import backproject, project_volume

    t0 = time.perf_counter()
    b = projections.reshape(1, *projections.shape[-3:]).float()
    ones_v = torch.ones(1, *shape)
    row = project_volume(ones_v, geometry)
    col = backproject(torch.ones_like(b), geometry, shape)
    r = torch.where(row > 1e-6, 1.0 / row.clamp_min(1e-6), torch.zeros_like(row))
    c = torch.where(col > 1e-6, 1.0 / col.clamp_min(1e-6), torch.zeros_like(col))
    x = torch.zeros(1, *shape)
    history, seconds = [], time.perf_counter() - t0
    for it in range(1, int(iterations) + 1):
        t1 = time.perf_counter()
        with torch.no_grad():
            x = (x + lam * c * backproject(r * (b - project_volume(x, geometry)), geometry, shape)).clamp_min(0)
        seconds += time.perf_counter() - t1
        if callback is not None:
            history.append(callback(x[0], it, seconds))
    return x[0], seconds, history
