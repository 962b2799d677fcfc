"""Initial Gaussians for 3DGR-CT: ``random``, ``fbp`` (the 3DGR-CT heuristic), ``medgmae`` / ``medgmae*``.

Every initialiser returns one GaussianSet ``[1, k, ...]`` in the reconstruction
volume's normalised coordinates, with intensities in the reconstruction's units
(attenuation, rendered with the paper convention, c = 1). Their overall
intensity level is then matched to the measured projections by
:func:`calibrate_intensities` (one least-squares gain in the projection domain,
the quantity the fit itself minimises), so every initialisation starts from
the right mass and differs only in *where* and *how shaped* its Gaussians are.

* ``random``: centres uniform in the volume, isotropic scales (in mm) from the
  mean distance to the 3 nearest neighbours, equal intensities.
* ``fbp`` (3DGR-CT): threshold the FBP at ``threshold`` x its 99.9th
  percentile, sample voxels above it without replacement with probability
  proportional to the gradient magnitude (plus ``uniform_weight`` x its mean, so
  flat regions are not empty), jitter within the voxel, isotropic scales from
  the 3-nearest-neighbour distance (local density), intensity = FBP value.
* ``medgmae``: the FBP is expressed in HU (``mu_water``; percentiles when the
  units are unknown), HU-windowed to [0, 1] like the model's training data,
  resampled to the model's 1.5 mm grid (corner-aligned: normalised coordinates
  are unchanged), cut into overlapping model-size windows and predicted per
  window by ``medgmae_core.inference.predict_volume`` (merged into whole-volume
  coordinates without double counting). The
  prediction lives in windowed units rendered with the model's convention
  (amplitude c_model); it is converted to attenuation by
  ``I_recon = I_model * c_model * (mu_hi - mu_lo)`` with ``mu_lo, mu_hi`` the
  attenuation at the window's ends (the window's slope), before the common
  projection-domain gain corrects what a pure scaling cannot carry (the window's
  offset and clipping).
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import torch

from ..gaussians import GaussianSet

log = logging.getLogger(__name__)

INIT_METHODS = ("random", "fbp", "medgmae", "medgmae*")
KNN = 3


# ------------------------------------------------------------------ helpers
def _extent(extent_mm: Sequence[float]) -> np.ndarray:
    e = np.asarray(extent_mm, dtype=np.float64).reshape(3)
    if not np.all(e > 0):
        raise ValueError(f"volume_extent_mm must be three positive numbers, got {list(extent_mm)}")
    return e


def knn_scales(centres: np.ndarray, extent_mm: Sequence[float], knn: int = KNN,
               min_mm: float | None = None) -> np.ndarray:
    """Isotropic (in mm) scales ``[k, 3]`` in normalised units: the mean distance to the ``knn`` nearest
    neighbours, as 3DGS/3DGR-CT initialise from point density."""
    from scipy.spatial import cKDTree

    e = _extent(extent_mm)
    pts = np.asarray(centres, dtype=np.float64) * e  # mm
    k = len(pts)
    if k == 1:
        dist = np.array([e.min() / 4])
    else:
        n = min(knn, k - 1)
        d, _ = cKDTree(pts).query(pts, k=n + 1)
        dist = d[:, 1:].mean(1)
    floor = min_mm if min_mm is not None else 1e-3 * e.min()
    dist = np.maximum(dist, floor)
    return dist[:, None] / e[None, :]


def _isotropic_set(centres: np.ndarray, scales: np.ndarray, intensities: np.ndarray,
                   dtype=torch.float32) -> GaussianSet:
    c = torch.as_tensor(centres, dtype=torch.float64)[None]
    q = torch.zeros(1, len(centres), 4, dtype=torch.float64)
    q[..., 0] = 1
    return GaussianSet(c.clamp(0, 1), torch.as_tensor(scales, dtype=torch.float64)[None], q,
                       torch.as_tensor(intensities, dtype=torch.float64)[None]).to(dtype=dtype)


def _check_count(num_gaussians: int) -> int:
    if int(num_gaussians) < 1:
        raise ValueError(f"num_gaussians must be >= 1, got {num_gaussians}")
    return int(num_gaussians)


# -------------------------------------------------------------- initialisers
def init_random(num_gaussians: int, extent_mm: Sequence[float], *, intensity: float = 1.0,
                seed: int = 0) -> GaussianSet:
    """Uniform centres, kNN isotropic scales, equal intensities (rescaled later by calibration)."""
    k = _check_count(num_gaussians)
    rs = np.random.default_rng(seed)
    centres = rs.random((k, 3))
    return _isotropic_set(centres, knn_scales(centres, extent_mm), np.full(k, float(intensity)))


def gradient_magnitude(volume: torch.Tensor, spacing_mm: Sequence[float]) -> torch.Tensor:
    """``|grad V|`` by central differences (one-sided at the borders), per mm."""
    grads = torch.gradient(volume.double(), spacing=[float(s) for s in spacing_mm])
    return torch.sqrt(sum(g * g for g in grads))


def init_fbp(fbp_volume: torch.Tensor, extent_mm: Sequence[float], num_gaussians: int, *,
             threshold: float = 0.05, uniform_weight: float = 0.1, seed: int = 0) -> GaussianSet:
    """The 3DGR-CT heuristic (see the module doc). ``fbp_volume`` is ``[D, H, W]``."""
    vol = torch.as_tensor(fbp_volume).detach().double().cpu()
    if vol.dim() != 3:
        raise ValueError(f"fbp_volume must be [D, H, W], got shape {list(vol.shape)}")
    k = _check_count(num_gaussians)
    e = _extent(extent_mm)
    shape = np.asarray(vol.shape)
    spacing = e / (shape - 1)
    top = float(torch.quantile(vol.flatten()[:: max(1, vol.numel() // 1_000_000)], 0.999))
    if not top > 0:
        raise ValueError("the FBP has no positive values: nothing to initialise from (check the projections' sign)")
    mask = vol > threshold * top
    idx = torch.nonzero(mask.flatten()).flatten()
    if idx.numel() == 0:
        raise ValueError(f"no FBP voxel is above the threshold {threshold} x {top:.4g}")
    grad = gradient_magnitude(vol, spacing).flatten()[idx]
    weight = grad + uniform_weight * float(grad.mean()) + 1e-12
    gen = torch.Generator().manual_seed(int(seed))
    replace = k > idx.numel()
    pick = idx[torch.multinomial(weight, k, replacement=replace, generator=gen)]
    ijk = np.stack(np.unravel_index(pick.numpy(), tuple(shape)), 1).astype(np.float64)
    jitter = torch.rand(k, 3, generator=gen, dtype=torch.float64).numpy() - 0.5
    centres = np.clip((ijk + jitter) / (shape - 1), 0, 1)
    intens = vol.flatten()[pick].numpy()
    return _isotropic_set(centres, knn_scales(centres, e), np.maximum(intens, 1e-3 * top))


def fbp_to_window(fbp_volume: torch.Tensor, mu_water: float | None,
                  window: tuple[float, float] | None = None) -> tuple[torch.Tensor, float, float]:
    """The FBP as the model's input: HU-windowed to [0, 1].

    Returns ``(windowed, mu_lo, mu_hi)``: the attenuation at the window's ends, so
    ``mu ~= mu_lo + w (mu_hi - mu_lo)`` inside the window. With ``mu_water``
    None (units unknown, e.g. a real micro-CT) the window is the FBP's 1st to
    99.5th percentile instead.
    """
    from ..data.transforms import HU_WINDOW

    lo_hu, hi_hu = window or HU_WINDOW
    vol = torch.as_tensor(fbp_volume).detach().float()
    if mu_water is not None:
        if not mu_water > 0:
            raise ValueError(f"mu_water must be positive, got {mu_water}")
        mu_lo, mu_hi = mu_water * (1 + lo_hu / 1000.0), mu_water * (1 + hi_hu / 1000.0)
    else:
        sample = vol.flatten()[:: max(1, vol.numel() // 1_000_000)]
        mu_lo, mu_hi = float(torch.quantile(sample, 0.01)), float(torch.quantile(sample, 0.995))
        if not mu_hi > mu_lo:
            raise ValueError("the FBP is constant: cannot window it for the model")
    return ((vol - mu_lo) / (mu_hi - mu_lo)).clamp(0, 1), float(mu_lo), float(mu_hi)


def resample_corner_aligned(volume: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Trilinear resampling keeping the first and last voxel centres, so normalised coordinates are unchanged."""
    shape = tuple(int(n) for n in shape)
    if tuple(volume.shape) == shape:
        return volume
    out = torch.nn.functional.interpolate(volume[None, None].float(), size=shape, mode="trilinear",
                                          align_corners=True)
    return out[0, 0]


def model_grid_shape(shape: Sequence[int], spacing_mm: Sequence[float], model_spacing_mm: float | None) -> tuple:
    """The grid over the same extent at the model's spacing (corner-aligned)."""
    if model_spacing_mm is None:
        return tuple(int(n) for n in shape)
    if not model_spacing_mm > 0:
        raise ValueError(f"model_spacing_mm must be positive, got {model_spacing_mm}")
    return tuple(max(2, int(round((n - 1) * s / model_spacing_mm)) + 1) for n, s in zip(shape, spacing_mm))


def init_medgmae(fbp_volume: torch.Tensor, spacing_mm: Sequence[float], checkpoint, *, mu_water: float | None,
                 overlap: int | None = None, model_spacing_mm: float | None = 1.5, device: str = "cpu",
                 expect_star: bool | None = None) -> GaussianSet:
    """Zero-shot MedGMAE initialisation (see the module doc).

    ``checkpoint``: a path for ``medgmae_core.train.checkpoint.load_model`` or an
    already loaded ``(model, config)`` pair. The windowed FBP is resampled
    (corner-aligned, so normalised coordinates do not change) to
    ``model_spacing_mm`` (the pre-training spacing; None keeps the FBP's grid),
    then predicted in overlapping ``config.img_size`` windows (``overlap`` voxels,
    default a quarter window) and merged by ``inference.predict_volume``.
    Gaussians centred outside the volume (windows padded past its edge) are dropped.
    ``expect_star`` checks the checkpoint's kind (True for ``medgmae*``).
    """
    from ..inference import predict_volume
    from ..render.conventions import get_convention

    if isinstance(checkpoint, (tuple, list)):
        model, config = checkpoint
    else:
        from ..train.checkpoint import load_model

        model, config = load_model(checkpoint, device=device)
    objective = getattr(config, "objective", "gaussian")
    if objective == "voxel":
        raise ValueError(f"{checkpoint}: a voxel-MAE checkpoint predicts no Gaussians; use a MedGMAE or MedGMAE* one")
    if expect_star is not None and (objective == "gaussian_star") != expect_star:
        want = "a MedGMAE* (objective gaussian_star)" if expect_star else "a MedGMAE (objective gaussian)"
        raise ValueError(f"--init {'medgmae*' if expect_star else 'medgmae'} needs {want} checkpoint, "
                         f"got objective {objective!r}")
    vol = torch.as_tensor(fbp_volume).detach().float().cpu()
    windowed, mu_lo, mu_hi = fbp_to_window(vol, mu_water)
    grid = model_grid_shape(vol.shape, spacing_mm, model_spacing_mm)
    model_input = resample_corner_aligned(windowed, grid)
    window = tuple(int(n) for n in config.img_size)
    ov = max(0, min(window) // 4) if overlap is None else int(overlap)
    pred = predict_volume(model, model_input, overlap=ov).gaussians.detach().to(torch.float32)
    inside = ((pred.centres[0] >= 0) & (pred.centres[0] <= 1)).all(-1)
    pred = pred.select(inside)
    if pred.num_gaussians == 0:
        raise ValueError("the model predicted no Gaussians inside the volume (is the checkpoint trained?)")
    amplitude = get_convention(getattr(config, "render_convention", "paper")).amplitude
    scale = amplitude * (mu_hi - mu_lo)
    log.info("medgmae init: %d Gaussians from %s windows on a %s grid; intensity x %.4g", pred.num_gaussians,
             window, grid, scale)
    return GaussianSet(pred.centres, pred.scales, pred.quaternions, pred.intensities.clamp_min(1e-8) * scale)


# ------------------------------------------------------------- calibration
@torch.no_grad()
def calibrate_intensities(gaussians: GaussianSet, project: Callable[[GaussianSet], torch.Tensor],
                          measured: torch.Tensor) -> tuple[GaussianSet, float]:
    """Scale all intensities by the least-squares gain ``<P g, m> / <P g, P g>`` in the projection domain."""
    pred = project(gaussians)
    m = measured.reshape(pred.shape).to(pred)
    den = float((pred * pred).sum())
    if not den > 0:
        raise ValueError("the initial Gaussians project to zero: they lie outside the field of view")
    gain = float((pred * m).sum()) / den
    if not gain > 0:
        log.warning("least-squares intensity gain %.3g is not positive; keeping the intensities", gain)
        return gaussians, 1.0
    return GaussianSet(gaussians.centres, gaussians.scales, gaussians.quaternions, gaussians.intensities * gain), gain


def initialise(method: str, *, fbp_volume: torch.Tensor, extent_mm: Sequence[float], num_gaussians: int,
               checkpoint=None, mu_water: float | None = None, seed: int = 0, overlap: int | None = None,
               model_spacing_mm: float | None = 1.5, device: str = "cpu") -> GaussianSet:
    """Dispatch on ``method`` in :data:`INIT_METHODS` (before calibration)."""
    method = method.lower()
    if method not in INIT_METHODS:
        raise ValueError(f"--init must be one of {INIT_METHODS}, got {method!r}")
    if method == "random":
        return init_random(num_gaussians, extent_mm, seed=seed)
    if method == "fbp":
        return init_fbp(fbp_volume, extent_mm, num_gaussians, seed=seed)
    if checkpoint is None:
        raise ValueError(f"--init {method} needs a model checkpoint (--checkpoint PATH)")
    spacing = _extent(extent_mm) / (np.asarray(fbp_volume.shape[-3:]) - 1)
    return init_medgmae(fbp_volume, tuple(spacing), checkpoint, mu_water=mu_water, overlap=overlap,
                        model_spacing_mm=model_spacing_mm, device=device, expect_star=(method == "medgmae*"))


__all__ = ["INIT_METHODS", "init_random", "init_fbp", "init_medgmae", "fbp_to_window", "calibrate_intensities",
           "initialise", "knn_scales", "gradient_magnitude",
           "resample_corner_aligned", "model_grid_shape"]
