"""Fit Gaussians straight to a volume with the renderer (no network): the direct-fit bound of the
pre-training benchmark, and a way to turn a CT into an inspectable Gaussian set (``medgmae fit``).

The fit is the 3DGR-CT loop of :mod:`medgmae_core.recon.fit` with the renderer in place of the X-ray
projector: the "measurement" is the volume itself, so the same parameterisation, Adam groups,
densify/prune and checkpoints apply. The start is the anchored layout of the model
(:func:`medgmae_core.model.gaussian_decoder.anchor_grid`): k Gaussians on a near-cubic grid, isotropic
scale ``init_scale_ratio`` x the cell size, amplitude set from the volume at the anchor so the initial
render already follows the volume's low frequencies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .gaussians import GaussianSet
from .model.configs import GAUSSIAN_INTEGRAL, ModelConfig
from .model.gaussian_decoder import anchor_grid
from .recon.fit import FitConfig, FitResult, GaussianParams, ReconstructionFit
from .render import render_volume

INIT_SCALE_RATIO = 0.5
MAX_INTENSITY_FACTOR = 4.0  # sigmoid ceiling, relative to the largest initial amplitude


def grid_gaussians(volume: torch.Tensor, num_gaussians: int, init_scale_ratio: float = INIT_SCALE_RATIO
                   ) -> GaussianSet:
    """``[1, k]`` Gaussians on the anchor grid of ``volume [D, H, W]`` with amplitudes from the volume."""
    if volume.dim() != 3:
        raise ValueError(f"volume must be [D, H, W], got shape {tuple(volume.shape)}")
    if num_gaussians < 1:
        raise ValueError(f"num_gaussians must be >= 1, got {num_gaussians}")
    shape = tuple(int(n) for n in volume.shape)
    config = ModelConfig(img_size=shape, patch_size=(1, 1, 1), num_gaussians=num_gaussians,
                         init_scale_ratio=init_scale_ratio, min_scale_ratio=init_scale_ratio / 2,
                         max_scale_ratio=init_scale_ratio * 2, embed_dim=6, num_heads=1, decoder_embed_dim=6,
                         decoder_num_heads=1)
    centres = anchor_grid(config).float()  # [k, 3] normalised
    scales = torch.tensor(config.initial_scale, dtype=torch.float32).expand(num_gaussians, 3)
    grid = (centres * 2 - 1).flip(-1)[None, :, None, None]  # grid_sample wants (x=W, y=H, z=D) in [-1, 1]
    values = torch.nn.functional.grid_sample(volume.float()[None, None], grid, align_corners=True)
    amplitude = values.reshape(-1).clamp_min(0) / (GAUSSIAN_INTEGRAL * init_scale_ratio ** 3)  # [k]
    quats = torch.zeros(num_gaussians, 4)
    quats[:, 0] = 1
    return GaussianSet(centres[None], scales[None].clone(), quats[None], amplitude[None])


class VolumeRenderer:
    """The fit's "projector": the whole rendered volume ``[1, D, H, W]`` (``views`` is ignored)."""

    def __init__(self, shape: tuple[int, int, int], *, cutoff: float = 3.0, backend: str = "auto") -> None:
        self.shape, self.cutoff, self.backend = shape, cutoff, backend

    def __call__(self, gaussians: GaussianSet, views=None) -> torch.Tensor:
        return render_volume(gaussians, self.shape, cutoff=self.cutoff, backend=self.backend)


def run_volume_fit(target: torch.Tensor, start: GaussianSet, iters: int, *, max_intensity: float,
                   densify: bool = False, reference: bool = False,
                   on_progress: Callable[[dict], None] | None = None, **config) -> ReconstructionFit:
    """The one image-domain fit: ``start`` fitted to ``target [D, H, W]`` by the 3DGR-CT loop with the renderer as
    its projector, run to ``iters``. Without ``densify`` the count stays fixed; ``config`` sets any other
    ``FitConfig`` field; ``reference=True`` scores PSNR against ``target`` (data range 1) as it goes."""
    if int(iters) < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    target = torch.as_tensor(target).detach().float()
    shape = tuple(int(n) for n in target.shape)
    defaults = {"eval_every": max(1, int(iters))}
    if not densify:
        defaults.update(densify_from=int(iters) + 1, densify_every=max(1, int(iters)))  # never
    cfg = FitConfig(iters=int(iters), **{**defaults, **config})
    params = GaussianParams.from_gaussians(start.detach().to(torch.float32), max_intensity=max_intensity)
    fit = ReconstructionFit(params, target[None], VolumeRenderer(shape), shape, cfg,
                            reference=target if reference else None, data_range=1.0 if reference else None)
    fit.run(on_progress=on_progress)
    return fit


@dataclass
class VolumeFit:
    gaussians: GaussianSet
    result: FitResult
    metrics: dict


def fit_volume(volume: torch.Tensor, num_gaussians: int, *, iters: int = 600, densify: bool = False,
               max_gaussians: int | None = None, on_progress: Callable[[dict], None] | None = None) -> VolumeFit:
    """Fit Gaussians from the anchor grid to ``volume [D, H, W]`` by MSE over every voxel.

    ``densify=False`` keeps exactly ``num_gaussians`` (the fixed-k bound); ``densify=True`` clones and splits
    by position gradient up to ``max_gaussians`` (default 4 k) until 70% of the iterations."""
    start = grid_gaussians(volume, num_gaussians)
    peak = float(start.intensities.max().clamp_min(1e-6)) * MAX_INTENSITY_FACTOR
    growth = dict(max_gaussians=max_gaussians or 4 * num_gaussians, densify_from=100,
                  densify_until=int(0.7 * iters)) if densify else {}
    fit = run_volume_fit(volume, start, iters, max_intensity=peak, densify=densify, reference=True,
                         on_progress=on_progress, eval_every=max(1, iters // 20), prune_intensity=0.0,
                         prune_scale_voxels=0.0, **growth)
    return VolumeFit(fit.result.gaussians(), fit.result, fit.final_metrics())
