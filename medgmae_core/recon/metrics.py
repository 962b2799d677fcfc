"""Image-quality metrics for reconstructions: PSNR and 3D SSIM.

Both compare a reconstruction with a reference volume in the same units
(attenuation, 1/mm, for simulated scans).

* **PSNR** ``= 10 log10(L^2 / MSE)``. The data range ``L`` defaults to
  ``reference.max() - reference.min()`` (stated in every metrics JSON as
  ``data_range``); pass ``data_range`` to fix it across runs.
* **SSIM** is the 3D version of Wang et al. (2004): local means, variances and
  covariance from a separable Gaussian window (sigma 1.5 voxels, truncated at
  3.5 sigma, i.e. 11 taps, as scikit-image's ``gaussian_weights=True``),
  constants ``K1 = 0.01``, ``K2 = 0.03`` of the same data range, averaged over
  the "valid" region (the window fully inside the volume). Axes shorter than
  the window fall back to a window of that axis' length (odd), so thin volumes
  still get a 3D score. ``ssim(..., slicewise=True)`` instead averages 2D SSIM
  over the slices of the last axis (documented alternative, not the default).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _as_volume(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 3:
        raise ValueError(f"{name} must be a volume [D, H, W] (or [1, D, H, W]), got shape {list(t.shape)}")
    return t.detach().to(torch.float64)


def _check_pair(volume, reference) -> tuple[torch.Tensor, torch.Tensor]:
    v, r = _as_volume(volume, "volume"), _as_volume(reference, "reference")
    if v.shape != r.shape:
        raise ValueError(f"volume shape {list(v.shape)} does not match reference shape {list(r.shape)}")
    return v, r.to(v.device)


def data_range_of(reference) -> float:
    """The default PSNR/SSIM data range: ``max - min`` of the reference."""
    r = _as_volume(reference, "reference")
    return float(r.max() - r.min())


def psnr(volume, reference, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical volumes."""
    v, r = _check_pair(volume, reference)
    rng = data_range_of(r) if data_range is None else float(data_range)
    if not rng > 0:
        raise ValueError(f"data_range must be positive, got {rng} (a constant reference needs an explicit data_range)")
    mse = float(((v - r) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(rng * rng / mse)


def gaussian_taps(size: int, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """A normalised 1D Gaussian window of ``size`` taps (odd)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _window_size(n: int, sigma: float) -> int:
    full = 2 * int(SSIM_TRUNCATE * sigma + 0.5) + 1
    if n >= full:
        return full
    return n if n % 2 == 1 else n - 1


def _filter_valid(x: torch.Tensor, taps: list[torch.Tensor]) -> torch.Tensor:
    """Separable 'valid' correlation of ``x [N, 1, D, H, W]`` with one 1D window per axis."""
    for axis, w in enumerate(taps):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = w.numel()
        x = F.conv3d(x, w.to(x).reshape(shape))
    return x


def ssim(volume, reference, data_range: float | None = None, *, sigma: float = SSIM_SIGMA,
         slicewise: bool = False) -> float:
    """Mean structural similarity (3D Gaussian window by default; see the module doc)."""
    v, r = _check_pair(volume, reference)
    rng = data_range_of(r) if data_range is None else float(data_range)
    if not rng > 0:
        raise ValueError(f"data_range must be positive, got {rng}")
    if slicewise:
        # 2D SSIM per slice of the last axis: a 3D window of length 1 along it.
        taps = [gaussian_taps(_window_size(n, sigma), sigma) for n in v.shape[:2]] + [torch.ones(1, dtype=torch.float64)]
    else:
        taps = [gaussian_taps(_window_size(n, sigma), sigma) for n in v.shape]
    c1, c2 = (SSIM_K1 * rng) ** 2, (SSIM_K2 * rng) ** 2
    stack = torch.stack([v, r, v * v, r * r, v * r])[:, None]  # [5, 1, D, H, W]
    mu_v, mu_r, e_vv, e_rr, e_vr = _filter_valid(stack, taps)[:, 0]
    var_v, var_r, cov = e_vv - mu_v ** 2, e_rr - mu_r ** 2, e_vr - mu_v * mu_r
    num = (2 * mu_v * mu_r + c1) * (2 * cov + c2)
    den = (mu_v ** 2 + mu_r ** 2 + c1) * (var_v + var_r + c2)
    return float((num / den).mean())


def first_reaching(history: list[dict], target: float) -> dict | None:
    """The first evaluation in ``history`` (entries with ``iteration``, ``seconds``, ``psnr``) at or above
    ``target`` dB: ``{"iteration", "seconds"}``, or None if never reached."""
    for h in history:
        value = h.get("psnr")
        if value is not None and value >= target:
            return {"iteration": h["iteration"], "seconds": h.get("seconds")}
    return None


def progress_against_baseline(history: list[dict], baseline_psnr: float | None,
                              absolute: tuple[float, ...] = (30.0, 35.0),
                              margins: tuple[float, ...] = (0.0, 2.0, 4.0)) -> dict:
    """Iterations and fit seconds to reach the analytic baseline (FBP/FDK) + each margin, and each absolute PSNR.

    Keys: ``iterations_to_fdk``, ``seconds_to_fdk``, ``iterations_to_fdk_plus2`` ... (``None`` when not reached
    within the run; resolution: the evaluation interval) and ``iterations_to_psnr30`` ... ."""
    out: dict = {}
    if baseline_psnr is not None and math.isfinite(baseline_psnr):
        for m in margins:
            name = "fdk" if m == 0 else f"fdk_plus{m:g}"
            hit = first_reaching(history, baseline_psnr + m)
            out[f"target_{name}_psnr"] = baseline_psnr + m
            out[f"iterations_to_{name}"] = hit["iteration"] if hit else None
            out[f"seconds_to_{name}"] = hit["seconds"] if hit else None
    for t in absolute:
        hit = first_reaching(history, t)
        out[f"iterations_to_psnr{t:g}"] = hit["iteration"] if hit else None
        out[f"seconds_to_psnr{t:g}"] = hit["seconds"] if hit else None
    return out


__all__ = ["psnr", "ssim", "data_range_of", "gaussian_taps", "first_reaching", "progress_against_baseline"]
