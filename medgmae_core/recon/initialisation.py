"""Initial Gaussians for 3DGR-CT: ``random``, ``3dgr``, ``fbp``, ``medgmae`` / ``medgmae*`` (and the oracle).

They start from the analytic reconstruction of the projections (:func:`analytic_reconstruction`: FBP for
parallel beam, FDK for cone beam); :func:`default_max_intensity` is the fit's intensity bound taken from it.

Every initialiser returns one GaussianSet ``[1, k, ...]`` in the reconstruction
volume's normalised coordinates, with intensities in the reconstruction's units
(attenuation, rendered with the paper convention, c = 1). Their overall
intensity level is then matched to the measured projections by least squares in
the projection domain (the quantity the fit itself minimises):
:func:`calibrate_intensities` (one gain) for ``random``, ``3dgr`` and ``fbp``;
:func:`joint_gains` (one gain per Gaussian set, solved jointly) for the
zero-shot sets. :func:`initialise_calibrated` does both steps.

* ``random``: centres uniform in the volume, isotropic scales (in mm) from the
  mean distance to the 3 nearest neighbours, equal intensities.
* ``3dgr``: 3DGR-CT's own ``create_from_fbp``, as its code does it
  (:func:`init_3dgr`): a half-resolution FBP (every second voxel), voxels below
  an absolute threshold (0.05) zeroed, all voxels of that grid ranked by
  gradient magnitude (forward differences), the top 15% of D*H*W skipped and the
  next 50k taken; isotropic scale ``0.15 / n`` (normalised units) with ``n`` the
  sampled voxels in the 5^3 window around it (itself included); intensity
  ``0.25 * FBP + 0.001``. 3DGR-CT's images are roughly in [0, 1]; ours are in
  1/mm, so the FBP is first divided by its 99.9th percentile (the threshold and
  the +0.001 are in those units) and intensities multiplied back. Differences
  from its code: centres at the sampled voxels' true positions (its code divides
  the low-resolution index by D, not D - 1, shifting them by up to one voxel)
  and the common projection-domain gain afterwards.
* ``fbp`` (this repository's heuristic, kept beside ``3dgr`` for comparison):
  threshold the FBP at ``threshold`` x its 99.9th percentile, sample voxels
  above it without replacement with probability proportional to the gradient
  magnitude (plus ``uniform_weight`` x its mean, so flat regions are not empty),
  jitter within the voxel, isotropic scales (in mm) from the 3-nearest-neighbour
  distance, intensity = FBP value.
* ``medgmae`` / ``medgmae*`` (zero-shot): the FBP is expressed in HU
  (``mu_water``; percentiles when the units are unknown), HU-windowed to
  [0, 1] like the model's training data, resampled to the model's 1.5 mm grid
  (corner-aligned: normalised coordinates are unchanged), cut into overlapping
  model-size windows and predicted per window by
  ``medgmae_core.inference.predict_volume`` (merged without double counting):
  :func:`predict_medgmae`. The prediction renders the *windowed* volume v, and
  attenuation is affine in it inside the window, ``mu = mu_lo + (mu_hi - mu_lo) v``.
  :func:`convert_prediction` represents both parts explicitly:

  - the **converted set**: the prediction with intensities
    ``I * c_model * (mu_hi - mu_lo)`` (the window's slope);
  - a **residual set** for what the prediction does not model: the offset
    ``mu_lo`` everywhere the window is open (the FBP inside the window), and the
    clipped content (air and lung below it, bone and contrast above it), where
    the target is ``FBP - render(converted)``. Inside the window the residual
    target is the constant ``mu_lo``, not the FBP, so the soft-tissue detail
    comes from the prediction alone. The residual set starts from the ``fbp``
    heuristic on that target and is fitted to it in the image domain
    (``residual_fit_iters`` Adam steps of :func:`fit_to_volume`).

  The two gains are then solved jointly by least squares in the projection
  domain (:func:`joint_gains`). With a perfect prediction both are ~1.
* ``oracle`` (benchmarks and tests): a direct image-domain Gaussian fit to the
  *windowed ground truth* (what a perfect model would predict), pushed through
  the same :func:`convert_prediction`.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Callable, Sequence

import numpy as np
import torch
from scipy.spatial import cKDTree

from ..data.transforms import HU_WINDOW
from ..gaussians import GaussianSet
from ..inference import predict_volume
from ..render import render_volume
from ..render.conventions import get_convention
from ..train.checkpoint import load_model
from ..volume_fit import VolumeRenderer, run_volume_fit
from ..xray.fbp import FILTERS, reconstruct_analytic
from .projection_data import ProjectionData

log = logging.getLogger(__name__)

INIT_METHODS = ("random", "3dgr", "fbp", "medgmae", "medgmae*")
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


# ------------------------------------------------------- the analytic start
def analytic_reconstruction(data: ProjectionData, filter_name: str = "ram-lak") -> torch.Tensor:
    """FBP (parallel) or FDK (cone) of the measured projections -> ``[D, H, W]``: what every initialiser starts
    from."""
    if filter_name not in FILTERS:
        raise ValueError(f"--filter must be one of {FILTERS}, got {filter_name!r}")
    return reconstruct_analytic(data.projections[None], data.geometry, data.volume_shape, filter=filter_name)[0]


def default_max_intensity(fbp_volume: torch.Tensor) -> float:
    """The intensity bound of the parameterisation: 2 x the FBP's 99.9th percentile (a Gaussian never needs
    more than the brightest voxel; overlapping ones need less)."""
    sample = fbp_volume.flatten()[:: max(1, fbp_volume.numel() // 1_000_000)].float()
    top = float(torch.quantile(sample, 0.999))
    if not top > 0:
        raise ValueError("the FBP has no positive values; are the projections line integrals (-log of transmission)?")
    return 2.0 * top


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


THREEDGR_DEFAULTS = {"num_samples": 50_000, "air_threshold": 0.05, "start": 0.15, "ini_sigma": 0.15,
                     "ini_intensity": 0.25, "neighbourhood": 5}


def init_3dgr(fbp_volume: torch.Tensor, extent_mm: Sequence[float], *, num_samples: int = 50_000,
              air_threshold: float = 0.05, start: float = 0.15, ini_sigma: float = 0.15,
              ini_intensity: float = 0.25, neighbourhood: int = 5, level: float | None = None) -> GaussianSet:
    """3DGR-CT's ``create_from_fbp`` (see the module doc). ``fbp_volume`` is ``[D, H, W]`` (full resolution;
    the half-resolution grid is taken here). ``level``: the FBP value that maps to 1 in 3DGR-CT's units
    (default its 99.9th percentile). ``num_samples`` is capped at what the grid holds after the skipped 15%."""
    vol = torch.as_tensor(fbp_volume).detach().double().cpu()
    if vol.dim() != 3:
        raise ValueError(f"fbp_volume must be [D, H, W], got shape {list(vol.shape)}")
    _extent(extent_mm)
    if not 0 <= start < 1:
        raise ValueError(f"start must be in [0, 1), got {start}")
    if level is None:
        level = float(torch.quantile(vol.flatten()[:: max(1, vol.numel() // 1_000_000)], 0.999))
    if not level > 0:
        raise ValueError("the FBP has no positive values: nothing to initialise from (check the projections' sign)")
    low = (vol / level)[::2, ::2, ::2].clone()  # half resolution: every second voxel, as 3DGR-CT
    low[low < air_threshold] = 0
    shape = tuple(low.shape)
    if min(shape) < 3:
        raise ValueError(f"the half-resolution FBP {list(shape)} is too small for 3DGR-CT's initialisation")
    core = low[1:-1, 1:-1, 1:-1]
    grad = torch.zeros_like(low)
    grad[1:-1, 1:-1, 1:-1] = torch.sqrt((core - low[1:-1, 1:-1, 2:]) ** 2 + (core - low[1:-1, 2:, 1:-1]) ** 2
                                        + (core - low[2:, 1:-1, 1:-1]) ** 2)
    total = low.numel()
    skip = int(start * total)
    take = min(_check_count(num_samples), total - skip)
    if take < 1:
        raise ValueError(f"nothing left to sample: the grid has {total} voxels and {skip} are skipped")
    order = torch.topk(grad.flatten(), skip + take).indices[skip:]
    ijk = torch.stack(torch.unravel_index(order, shape), -1)  # [take, 3] half-resolution indices
    occupied = torch.zeros(shape, dtype=torch.float64)
    occupied[ijk[:, 0], ijk[:, 1], ijk[:, 2]] = 1.0
    kernel = torch.ones(1, 1, neighbourhood, neighbourhood, neighbourhood, dtype=torch.float64)
    counts = torch.nn.functional.conv3d(occupied[None, None], kernel, padding=neighbourhood // 2)[0, 0]
    n_near = counts[ijk[:, 0], ijk[:, 1], ijk[:, 2]].clamp_min(1)
    sigma = (ini_sigma / n_near).numpy()
    intens = (ini_intensity * low[ijk[:, 0], ijk[:, 1], ijk[:, 2]] + 0.001).numpy() * level
    full = np.asarray(vol.shape, dtype=np.float64)
    centres = np.clip(2.0 * ijk.numpy().astype(np.float64) / (full - 1), 0, 1)  # low voxel i = full voxel 2i
    return _isotropic_set(centres, np.repeat(sigma[:, None], 3, 1), intens)


def fbp_to_window(fbp_volume: torch.Tensor, mu_water: float | None,
                  window: tuple[float, float] | None = None) -> tuple[torch.Tensor, float, float]:
    """The FBP as the model's input: HU-windowed to [0, 1].

    Returns ``(windowed, mu_lo, mu_hi)``: the attenuation at the window's ends, so
    ``mu ~= mu_lo + w (mu_hi - mu_lo)`` inside the window. With ``mu_water``
    None (units unknown, e.g. a real micro-CT) the window is the FBP's 1st to
    99.5th percentile instead.
    """
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


def load_checkpoint_model(checkpoint, device: str = "cpu", expect_star: bool | None = None):
    """``(model, config)`` from a path or an already loaded pair, checking the checkpoint's kind."""
    if isinstance(checkpoint, (tuple, list)):
        model, config = checkpoint
    else:
        model, config = load_model(checkpoint, device=device)
    objective = getattr(config, "objective", "gaussian")
    if objective == "voxel":
        raise ValueError(f"{checkpoint}: a voxel-MAE checkpoint predicts no Gaussians; use a MedGMAE or MedGMAE* one")
    if expect_star is not None and (objective == "gaussian_star") != expect_star:
        want = "a MedGMAE* (objective gaussian_star)" if expect_star else "a MedGMAE (objective gaussian)"
        raise ValueError(f"--init {'medgmae*' if expect_star else 'medgmae'} needs {want} checkpoint, "
                         f"got objective {objective!r}")
    return model, config


def predict_medgmae(fbp_volume: torch.Tensor, spacing_mm: Sequence[float], checkpoint, *, mu_water: float | None,
                    overlap: int | None = None, model_spacing_mm: float | None = 1.5, device: str = "cpu",
                    expect_star: bool | None = None) -> tuple[GaussianSet, float, float]:
    """The model's zero-shot prediction for the FBP: ``(gaussians, mu_lo, mu_hi)``.

    The Gaussians are in whole-volume normalised coordinates with intensities in
    *windowed* units for the paper convention (the model's amplitude c_model
    folded in), so ``render_volume(gaussians, shape)`` approximates the windowed
    FBP ``(mu - mu_lo) / (mu_hi - mu_lo)`` clipped to [0, 1]. See :func:`init_medgmae`
    for the windows and resampling.
    """
    model, config = load_checkpoint_model(checkpoint, device, expect_star)
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
    log.info("medgmae prediction: %d Gaussians from %s windows on a %s grid", pred.num_gaussians, window, grid)
    return (GaussianSet(pred.centres, pred.scales, pred.quaternions, pred.intensities.clamp_min(1e-8) * amplitude),
            mu_lo, mu_hi)


def init_medgmae(fbp_volume: torch.Tensor, spacing_mm: Sequence[float], checkpoint, *, mu_water: float | None,
                 overlap: int | None = None, model_spacing_mm: float | None = 1.5, device: str = "cpu",
                 expect_star: bool | None = None) -> GaussianSet:
    """The zero-shot prediction converted by the window's slope (the *converted set*; see the module doc).

    ``checkpoint``: a path for ``medgmae_core.train.checkpoint.load_model`` or an
    already loaded ``(model, config)`` pair. The windowed FBP is resampled
    (corner-aligned, so normalised coordinates do not change) to
    ``model_spacing_mm`` (the pre-training spacing; None keeps the FBP's grid),
    then predicted in overlapping ``config.img_size`` windows (``overlap`` voxels,
    default a quarter window) and merged by ``inference.predict_volume``.
    Gaussians centred outside the volume (windows padded past its edge) are dropped.
    ``expect_star`` checks the checkpoint's kind (True for ``medgmae*``).
    This alone lacks the window's offset and clipped content: use
    :func:`convert_prediction` (or :func:`initialise_calibrated`) for the full conversion.
    """
    pred, mu_lo, mu_hi = predict_medgmae(fbp_volume, spacing_mm, checkpoint, mu_water=mu_water, overlap=overlap,
                                         model_spacing_mm=model_spacing_mm, device=device, expect_star=expect_star)
    return slope_converted(pred, mu_lo, mu_hi)


def slope_converted(pred_windowed: GaussianSet, mu_lo: float, mu_hi: float) -> GaussianSet:
    """Windowed-unit Gaussians -> attenuation by the window's slope ``mu_hi - mu_lo`` (no offset)."""
    if not mu_hi > mu_lo:
        raise ValueError(f"the window's ends must satisfy mu_hi > mu_lo, got {mu_lo}, {mu_hi}")
    p = pred_windowed
    return GaussianSet(p.centres, p.scales, p.quaternions, p.intensities * (mu_hi - mu_lo))


def residual_target(converted: GaussianSet, fbp_volume: torch.Tensor, mu_lo: float, mu_hi: float,
                    render=None) -> torch.Tensor:
    """What the converted prediction does not model, ``[D, H, W]`` (>= 0): the offset ``mu_lo`` where the FBP is
    inside the window, ``FBP - render(converted)`` where the window clips it (below: air, lung; above: bone,
    contrast)."""
    render = render_volume if render is None else render
    fbp = torch.as_tensor(fbp_volume).detach().float().cpu()
    with torch.no_grad():
        rendered = render(converted.detach().to(torch.float32), tuple(fbp.shape))[0].cpu()
    w = (fbp - mu_lo) / (mu_hi - mu_lo)
    inside = (w > 0) & (w < 1)
    return torch.where(inside, torch.full_like(fbp, float(mu_lo)), fbp - rendered).clamp_min(0.0)


def fit_to_volume(target: torch.Tensor, gaussians: GaussianSet, iters: int, *, densify: bool = False,
                  seed: int = 0, max_intensity: float | None = None, **config) -> GaussianSet:
    """Fit ``gaussians`` to a volume ``target [D, H, W]`` in the image domain (the 3DGR-CT loop with the renderer in
    place of the projector: Adam, 3DGR-CT learning rates, optional densify/prune), after one least-squares
    intensity gain. Returns the fitted set."""
    target = torch.as_tensor(target).detach().float()
    gaussians, _ = calibrate_intensities(gaussians.detach().to(torch.float32), VolumeRenderer(target.shape),
                                         target)  # mass first
    if max_intensity is None:
        top = float(torch.quantile(target.flatten()[:: max(1, target.numel() // 1_000_000)], 0.999))
        max_intensity = max(2.0 * top, 1.01 * float(gaussians.intensities.max()), 1e-12)
    return run_volume_fit(target, gaussians, iters, max_intensity=max_intensity, densify=densify, seed=seed,
                          **config).result.gaussians()


def convert_prediction(pred_windowed: GaussianSet, fbp_volume: torch.Tensor, mu_lo: float, mu_hi: float,
                       extent_mm: Sequence[float], *, residual_gaussians: int = 4000, residual_fit_iters: int = 100,
                       seed: int = 0) -> dict:
    """The zero-shot conversion (module doc): ``{"converted", "residual", "residual_target"}``.

    ``pred_windowed``: a prediction of the windowed volume in whole-volume coordinates (paper convention);
    ``residual_gaussians`` Gaussians start from the ``fbp`` heuristic on :func:`residual_target` and are fitted to
    it for ``residual_fit_iters`` image-domain steps. Combine the two with :func:`joint_gains`.
    """
    converted = slope_converted(pred_windowed.detach().to(torch.float32), mu_lo, mu_hi)
    target = residual_target(converted, fbp_volume, mu_lo, mu_hi)
    if not float(target.max()) > 0:
        return {"converted": converted, "residual": None, "residual_target": target}
    residual = init_fbp(target, extent_mm, residual_gaussians, uniform_weight=1.0, seed=seed)
    if residual_fit_iters > 0:
        residual = fit_to_volume(target, residual, residual_fit_iters, seed=seed)
    return {"converted": converted, "residual": residual, "residual_target": target}


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


@torch.no_grad()
def joint_gains(sets: Sequence[GaussianSet | None], project: Callable[[GaussianSet], torch.Tensor],
                measured: torch.Tensor) -> tuple[GaussianSet, list[float]]:
    """One intensity gain per set, solved jointly: ``min || sum_i g_i P(set_i) - m ||^2`` with ``g_i >= 0``
    (exact non-negative least squares over the few sets: the best unconstrained solution on every subset).
    Returns the merged, scaled set (sets with gain 0 dropped) and the gains (0 for a missing set)."""
    present = [i for i, g in enumerate(sets) if g is not None and g.num_gaussians > 0]
    if not present:
        raise ValueError("no Gaussians to calibrate")
    cols = [project(sets[i]).reshape(-1).double() for i in present]
    m = measured.reshape(-1).to(cols[0])
    a = torch.stack(cols, 1)  # [n_pixels, n_sets]
    gram, rhs = a.T @ a, a.T @ m
    best, best_err = None, math.inf
    n = len(present)
    for mask in range(1, 1 << n):
        idx = [j for j in range(n) if mask >> j & 1]
        sub = gram[idx][:, idx]
        if float(torch.linalg.det(sub)) <= 1e-30 * float(sub.diagonal().prod()):
            continue
        sol = torch.linalg.solve(sub, rhs[idx])
        if bool((sol <= 0).any()):
            continue
        full = torch.zeros(n, dtype=torch.float64)
        full[idx] = sol.cpu()
        err = float(((a @ full.to(a) - m) ** 2).sum())
        if err < best_err:
            best, best_err = full, err
    if best is None:
        raise ValueError("the initial Gaussians project to zero or against the measurements: no positive gain fits")
    gains = [0.0] * len(sets)
    parts = []
    for j, i in enumerate(present):
        gains[i] = float(best[j])
        if gains[i] > 0:
            g = sets[i]
            parts.append(GaussianSet(g.centres, g.scales, g.quaternions, g.intensities * gains[i]))
    return GaussianSet.cat(parts), gains


# random / fbp / the zero-shot total: the count measured on the 96^3 chest-CTA window (+4.4 dB over FDK)
DEFAULT_COUNTS = {"random": 20_000, "fbp": 20_000, "3dgr": THREEDGR_DEFAULTS["num_samples"]}
DEFAULT_ZERO_SHOT_GAUSSIANS = 20_000
DEFAULT_RESIDUAL_FIT_ITERS = 100


def default_count(method: str, num_gaussians: int | None) -> int:
    """``num_gaussians``, or the method's default initial count (3DGR-CT: 50k; random, fbp and the zero-shot
    total, predicted + residual: 20k)."""
    if num_gaussians is not None:
        return _check_count(num_gaussians)
    return DEFAULT_COUNTS.get(method.lower(), DEFAULT_ZERO_SHOT_GAUSSIANS)


def _zero_shot_sets(method: str, *, fbp_volume, extent_mm, num_gaussians, checkpoint, mu_water, seed, overlap,
                    model_spacing_mm, device, prediction, residual_fit_iters) -> tuple[dict, dict]:
    if prediction is not None:
        pred, mu_lo, mu_hi = prediction
    else:
        if checkpoint is None:
            raise ValueError(f"--init {method} needs a model checkpoint (--checkpoint PATH)")
        spacing = _extent(extent_mm) / (np.asarray(fbp_volume.shape[-3:]) - 1)
        pred, mu_lo, mu_hi = predict_medgmae(fbp_volume, tuple(spacing), checkpoint, mu_water=mu_water,
                                             overlap=overlap, model_spacing_mm=model_spacing_mm, device=device,
                                             expect_star=(method == "medgmae*"))
    # the same initial count as every other init: the residual set takes what the prediction leaves, but at
    # least half (it carries the window's offset everywhere in the body)
    residual_count = max(num_gaussians - pred.num_gaussians, (num_gaussians + 1) // 2)
    parts = convert_prediction(pred, fbp_volume, mu_lo, mu_hi, extent_mm, residual_gaussians=residual_count,
                               residual_fit_iters=residual_fit_iters, seed=seed)
    info = {"mu_lo": mu_lo, "mu_hi": mu_hi, "predicted_gaussians": parts["converted"].num_gaussians,
            "residual_gaussians": parts["residual"].num_gaussians if parts["residual"] is not None else 0,
            "residual_fit_iters": residual_fit_iters}
    return parts, info


def initialise(method: str, *, fbp_volume: torch.Tensor, extent_mm: Sequence[float], num_gaussians: int | None = None,
               checkpoint=None, mu_water: float | None = None, seed: int = 0, overlap: int | None = None,
               model_spacing_mm: float | None = 1.5, device: str = "cpu", prediction=None,
               residual_fit_iters: int = DEFAULT_RESIDUAL_FIT_ITERS) -> GaussianSet:
    """Dispatch on ``method`` in :data:`INIT_METHODS` (before calibration; prefer :func:`initialise_calibrated`).
    For ``medgmae``/``medgmae*`` (or ``prediction=(windowed set, mu_lo, mu_hi)``, e.g. the oracle) this is the
    converted set plus the residual set with unit gains; ``num_gaussians`` is their total (the residual set
    takes ``num_gaussians`` minus the predicted count, and at least half of ``num_gaussians``)."""
    method = method.lower()
    if method not in INIT_METHODS and not (method == "oracle" and prediction is not None):
        raise ValueError(f"--init must be one of {INIT_METHODS}, got {method!r}")
    k = default_count(method, num_gaussians)
    if method == "random":
        return init_random(k, extent_mm, seed=seed)
    if method == "fbp":
        return init_fbp(fbp_volume, extent_mm, k, seed=seed)
    if method == "3dgr":
        return init_3dgr(fbp_volume, extent_mm, num_samples=k)
    parts, _ = _zero_shot_sets(method, fbp_volume=fbp_volume, extent_mm=extent_mm, num_gaussians=k,
                               checkpoint=checkpoint, mu_water=mu_water, seed=seed, overlap=overlap,
                               model_spacing_mm=model_spacing_mm, device=device, prediction=prediction,
                               residual_fit_iters=residual_fit_iters)
    return GaussianSet.cat([g for g in (parts["converted"], parts["residual"]) if g is not None])


def initialise_calibrated(method: str, *, fbp_volume: torch.Tensor, extent_mm: Sequence[float],
                          project: Callable[[GaussianSet], torch.Tensor], measured: torch.Tensor,
                          num_gaussians: int | None = None, checkpoint=None, mu_water: float | None = None,
                          seed: int = 0, overlap: int | None = None, model_spacing_mm: float | None = 1.5,
                          device: str = "cpu", prediction=None,
                          residual_fit_iters: int = DEFAULT_RESIDUAL_FIT_ITERS) -> tuple[GaussianSet, dict]:
    """The initial Gaussians matched to the measured projections, and what was done (``info``).

    ``random``/``3dgr``/``fbp``: one least-squares gain. Zero-shot (``medgmae``, ``medgmae*``, or a given
    ``prediction`` such as the oracle's): the converted and residual sets with joint gains (module doc)."""
    method = method.lower()
    t0 = time.perf_counter()
    if method in ("random", "fbp", "3dgr"):
        g = initialise(method, fbp_volume=fbp_volume, extent_mm=extent_mm, num_gaussians=num_gaussians, seed=seed)
        g, gain = calibrate_intensities(g, project, measured)
        return g, {"intensity_gain": gain, "initial_gaussians": g.num_gaussians,
                   "init_seconds": time.perf_counter() - t0}
    if method not in INIT_METHODS and not (method == "oracle" and prediction is not None):
        raise ValueError(f"--init must be one of {INIT_METHODS}, got {method!r}")
    parts, info = _zero_shot_sets(method, fbp_volume=fbp_volume, extent_mm=extent_mm,
                                  num_gaussians=default_count(method, num_gaussians), checkpoint=checkpoint,
                                  mu_water=mu_water, seed=seed, overlap=overlap, model_spacing_mm=model_spacing_mm,
                                  device=device, prediction=prediction, residual_fit_iters=residual_fit_iters)
    g, gains = joint_gains([parts["converted"], parts["residual"]], project, measured)
    info.update(gain_converted=gains[0], gain_residual=gains[1], initial_gaussians=g.num_gaussians,
                init_seconds=time.perf_counter() - t0)
    log.info("zero-shot init: %d predicted + %d residual Gaussians, gains %.3g / %.3g", info["predicted_gaussians"],
             info["residual_gaussians"], gains[0], gains[1])
    return g, info


__all__ = ["INIT_METHODS", "analytic_reconstruction", "default_max_intensity", "init_random", "init_fbp", "init_3dgr", "init_medgmae", "predict_medgmae",
           "slope_converted", "residual_target", "convert_prediction", "fit_to_volume",
           "joint_gains", "fbp_to_window", "calibrate_intensities", "initialise", "initialise_calibrated",
           "default_count", "knn_scales", "gradient_magnitude", "resample_corner_aligned", "model_grid_shape",
           "THREEDGR_DEFAULTS"]
