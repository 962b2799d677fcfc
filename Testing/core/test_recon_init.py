"""Initialisations: the 3DGR-CT FBP heuristic, random, and zero-shot MedGMAE through sliding windows
(with a known-answer stand-in for the model, so positions and units can be checked exactly)."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medgmae_core.gaussians import GaussianSet
from medgmae_core.recon.initialisation import (calibrate_intensities, fbp_to_window, gradient_magnitude,
                                               init_fbp, init_medgmae, init_random, initialise, model_grid_shape)
from medgmae_core.recon.simulation import MU_WATER, hu_to_mu, load_ct_volume


class PeakFinder:
    """Stands in for a MedGMAE model: one Gaussian per window at the window's brightest voxel, with the
    voxel's windowed value as intensity (sigma 1.5 voxels)."""

    def __init__(self, window=(16, 16, 16), objective="gaussian", convention="paper"):
        self.config = SimpleNamespace(img_size=window, objective=objective, render_convention=convention)
        self.calls = 0

    def predict_gaussians(self, x, mask_ratio=0.0, generator=None):
        self.calls += x.shape[0]
        b, n = x.shape[0], torch.tensor(x.shape[2:], dtype=torch.float64)
        flat = x.reshape(b, -1)
        value, idx = flat.max(1)
        ijk = torch.stack([torch.as_tensor(a) for a in np.unravel_index(idx.numpy(), tuple(x.shape[2:]))], -1)
        centres = (ijk.double() / (n - 1))[:, None]  # [b, 1, 3]
        return GaussianSet.isotropic(centres, 1.5 / float(n[0] - 1), value.double()[:, None]).to(torch.float32)


def _blob_volume(shape, centre_vox, spacing, peak_hu=400.0):
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    r2 = sum((g - c * s) ** 2 for g, c, s in zip(grids, centre_vox, spacing))
    hu = -50.0 + (peak_hu + 50.0) * np.exp(-0.5 * r2 / 4.0 ** 2)  # soft tissue with a 4 mm blob
    return torch.from_numpy(hu_to_mu(hu)).float()


def test_medgmae_init_keeps_millimetre_positions_and_converts_units():
    shape, spacing = (20, 24, 12), (3.0, 2.5, 4.0)
    blob = (7.0, 15.0, 5.0)
    fbp = _blob_volume(shape, blob, spacing)
    model = PeakFinder()
    g = init_medgmae(fbp, spacing, (model, model.config), mu_water=MU_WATER, overlap=4)
    grid = model_grid_shape(shape, spacing, 1.5)
    assert grid == (39, 39, 30) and model.calls > 1  # resampled to 1.5 mm and cut into several windows
    extent = torch.tensor([(n - 1) * s for n, s in zip(shape, spacing)])
    brightest = int(g.intensities[0].argmax())
    got_mm = g.centres[0, brightest] * extent
    want_mm = torch.tensor([c * s for c, s in zip(blob, spacing)])
    assert torch.allclose(got_mm, want_mm, atol=0.76)  # within half a 1.5 mm model voxel
    # units: windowed ~1.0 (400 HU is above the window; trilinear resampling of the peak) -> (mu_hi - mu_lo) * amplitude (paper: 1)
    assert float(g.intensities[0, brightest]) == pytest.approx(MU_WATER * 0.425, rel=0.02)
    # shape: sigma 1.5 model voxels (~1.5 mm each: the corner-aligned grid's spacing) per axis, in mm^2
    model_voxel = extent / (torch.tensor(grid) - 1)
    cov_mm = g.covariances()[0, brightest] * extent[:, None] * extent[None, :]
    assert torch.allclose(cov_mm, torch.diag((1.5 * model_voxel) ** 2), atol=1e-3)
    # no Gaussian is counted twice: one per window cell at most
    assert g.num_gaussians <= model.calls
    # the release convention's amplitude 0.1 is part of the conversion
    rel = PeakFinder(convention="release")
    g_rel = init_medgmae(fbp, spacing, (rel, rel.config), mu_water=MU_WATER, overlap=4)
    assert float(g_rel.intensities.max()) == pytest.approx(0.1 * float(g.intensities.max()), rel=1e-4)


def test_medgmae_init_checks_the_checkpoint_kind():
    fbp = _blob_volume((12, 12, 12), (5, 5, 5), (2.0, 2.0, 2.0))
    for objective, star, msg in (("voxel", None, "voxel-MAE"), ("gaussian", True, "MedGMAE\\*"),
                                 ("gaussian_star", False, "a MedGMAE \\(objective gaussian\\)")):
        m = PeakFinder(objective=objective)
        with pytest.raises(ValueError, match=msg):
            init_medgmae(fbp, (2.0, 2.0, 2.0), (m, m.config), mu_water=MU_WATER, expect_star=star)
    with pytest.raises(ValueError, match="--checkpoint"):
        initialise("medgmae", fbp_volume=fbp, extent_mm=(22.0, 22.0, 22.0), num_gaussians=10)


def test_window_of_unknown_units_uses_percentiles():
    vol = torch.linspace(0, 1, 1000).reshape(10, 10, 10)
    w, lo, hi = fbp_to_window(vol, None)
    assert lo == pytest.approx(0.01, abs=2e-3) and hi == pytest.approx(0.995, abs=2e-3)
    assert float(w.min()) == 0.0 and float(w.max()) == 1.0


def test_fbp_heuristic_on_real_ct(small_real_ct):
    hu, _ = load_ct_volume(small_real_ct, crop="0:120,0:100,8:24", downsample=4)
    mu = torch.from_numpy(hu_to_mu(hu)).float()  # [30, 25, 4] at 12 mm
    extent = [(n - 1) * 12.0 for n in mu.shape]
    g = init_fbp(mu, extent, 400, seed=0)
    assert g.num_gaussians == 400
    ijk = torch.round(g.centres[0].double() * (torch.tensor(mu.shape) - 1)).long()
    values = mu[ijk[:, 0], ijk[:, 1], ijk[:, 2]]
    top = float(torch.quantile(mu.flatten(), 0.999))
    assert float((values > 0.05 * top * 0.5).float().mean()) > 0.95  # above the threshold (jitter aside)
    # sampled by gradient magnitude: the sampled voxels have a larger mean gradient than the object's voxels
    grad = gradient_magnitude(mu, [12.0] * 3)
    inside = mu > 0.05 * top
    assert float(grad[ijk[:, 0], ijk[:, 1], ijk[:, 2]].mean()) > 1.2 * float(grad[inside].mean())
    # isotropic in mm, from neighbour distances: scale x extent equal on all axes
    mm = g.scales[0] * torch.tensor(extent, dtype=torch.float32)
    assert torch.allclose(mm, mm[:, :1].expand_as(mm), rtol=1e-4)
    assert 3.0 < float(mm.median()) < 40.0
    r = init_random(300, extent, seed=1)
    assert float(r.centres.min()) >= 0 and float(r.centres.max()) <= 1 and r.num_gaussians == 300


def test_calibration_gain_is_least_squares():
    g = GaussianSet.random(1, 5, dtype=torch.float64)
    proj = lambda gs: gs.intensities[:, :, None] * torch.arange(1.0, 4.0, dtype=torch.float64)  # noqa: E731
    measured = 2.5 * proj(g)
    scaled, gain = calibrate_intensities(g, proj, measured)
    assert gain == pytest.approx(2.5) and torch.allclose(scaled.intensities, 2.5 * g.intensities)


# ----------------------------------------------------------- zero-shot conversion
def _phantom_scan(n=32, seed=7):
    from medgmae_core.data.phantom import make_phantom
    from medgmae_core.recon.simulation import simulate_scan

    ph = make_phantom((n, n, n), 96.0 / n, seed=seed, noise_hu=0.0)
    mu = torch.from_numpy(hu_to_mu(ph.hu)).float()
    data = simulate_scan(mu, (96.0 / n,) * 3, geometry="parallel", views=120)
    return mu, data


def test_residual_target_holds_the_offset_and_the_clipped_content():
    from medgmae_core.recon.initialisation import residual_target, slope_converted

    hu = torch.tensor([-1000.0, -600.0, -100.0, 0.0, 200.0, 900.0]).reshape(1, 2, 3).repeat(4, 1, 1)
    mu = hu_to_mu(hu)
    _, lo, hi = fbp_to_window(mu, MU_WATER)
    empty = slope_converted(GaussianSet.isotropic(torch.full((1, 1, 3), 0.5), 1e-4, torch.zeros(1, 1)), lo, hi)
    r = residual_target(empty, mu, lo, hi)
    assert lo == pytest.approx(MU_WATER * 0.825) and hi == pytest.approx(MU_WATER * 1.25)
    # below the window: the FBP itself; inside: exactly mu_lo; above: FBP (the empty prediction renders 0)
    assert torch.allclose(r[0, 0], torch.tensor([0.0, float(mu[0, 0, 1]), lo]), atol=1e-7)
    assert torch.allclose(r[0, 1], torch.tensor([lo, lo, float(mu[0, 1, 2])]), atol=1e-7)


def test_joint_gains_are_least_squares_and_non_negative():
    from medgmae_core.recon.initialisation import joint_gains

    a, b = GaussianSet.random(1, 4, dtype=torch.float64), GaussianSet.random(1, 3, dtype=torch.float64)
    weights = torch.rand(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def proj(g):  # a linear map of the intensities (distinct rows per set via the centres)
        return (g.intensities[0, :, None] * (weights[: g.num_gaussians] + g.centres[0, :, :1])).sum(0)

    measured = 2.0 * proj(a) + 0.5 * proj(b)
    merged, gains = joint_gains([a, b], proj, measured)
    assert gains == pytest.approx([2.0, 0.5], rel=1e-6) and merged.num_gaussians == 7
    # a set that only hurts gets gain 0 and is dropped (non-negative least squares)
    merged, gains = joint_gains([a, b], proj, 2.0 * proj(a) - 0.5 * proj(b))
    assert gains[1] == 0.0 and gains[0] > 0 and merged.num_gaussians == 4


def test_oracle_conversion_starts_within_1db_of_the_fit(one_torch_thread):
    """A direct Gaussian fit of the windowed ground truth (a perfect model's prediction) pushed through the
    zero-shot conversion starts within 1 dB of the fit's own PSNR; the old slope-only conversion does not."""
    import math

    from medgmae_core.recon.fit import GeometryProjector
    from medgmae_core.recon.initialisation import fit_to_volume, initialise_calibrated, slope_converted
    from medgmae_core.recon.metrics import psnr
    from medgmae_core.render import render_volume
    from medgmae_core.xray.fbp import reconstruct_analytic

    mu, data = _phantom_scan()
    shape = tuple(mu.shape)
    fbp = reconstruct_analytic(data.projections[None], data.geometry, data.volume_shape)[0]
    extent = data.geometry.volume_extent_mm
    rng = float(mu.max() - mu.min())
    v, lo, hi = fbp_to_window(mu, MU_WATER)
    assert float((v == 0).float().mean()) > 0.2 and float((v == 1).float().mean()) > 0.003  # air, bone/contrast
    fit = fit_to_volume(v, init_fbp(v, extent, 800, uniform_weight=1.0), 150)
    own = psnr(render_volume(fit, shape)[0], v, 1.0)  # the fit's own PSNR (model units, range 1)
    project = GeometryProjector(data.geometry)
    g, info = initialise_calibrated("oracle", fbp_volume=fbp, extent_mm=extent, project=lambda x: project(x),
                                    measured=data.projections, prediction=(fit, lo, hi), num_gaussians=1600)
    start = psnr(render_volume(g, shape)[0], mu, rng)
    assert start >= own - 1.0, (start, own)
    assert 0.8 < info["gain_converted"] < 1.25 and 0.8 < info["gain_residual"] < 1.25  # the units are right
    assert g.num_gaussians == info["predicted_gaussians"] + info["residual_gaussians"]
    assert info["residual_gaussians"] == 1600 - fit.num_gaussians  # num_gaussians is the total, as for fbp
    # the slope-only conversion (the old one: no offset, no residual, one gain) starts far lower
    old, gain = calibrate_intensities(slope_converted(fit, lo, hi), lambda x: project(x), data.projections)
    assert psnr(render_volume(old, shape)[0], mu, rng) < own - 4.0 and gain > 2.0
    assert math.isfinite(start)


def test_3dgr_init_follows_create_from_fbp(small_real_ct):
    from medgmae_core.recon.initialisation import init_3dgr

    hu, _ = load_ct_volume(small_real_ct, crop="0:120,0:100,0:30", downsample=2)
    mu = torch.from_numpy(hu_to_mu(hu)).float()  # [60, 50, 15] at 6 mm
    extent = [(n - 1) * 6.0 for n in mu.shape]
    g = init_3dgr(mu, extent, num_samples=2000)
    low = mu[::2, ::2, ::2]
    total = low.numel()
    assert g.num_gaussians == min(2000, total - int(0.15 * total))
    # centres on the half-resolution grid (every second full-resolution voxel)
    ijk_full = g.centres[0].double() * (torch.tensor(mu.shape, dtype=torch.float64) - 1)
    assert torch.allclose(ijk_full, 2 * torch.round(ijk_full / 2), atol=1e-3)
    ijk = torch.round(ijk_full / 2).long()
    # intensity = level * (0.25 * FBP / level + 0.001) where above the absolute threshold, else 0.001 * level
    level = float(torch.quantile(mu.flatten(), 0.999))
    f = (low / level)[ijk[:, 0], ijk[:, 1], ijk[:, 2]]
    f = torch.where(f < 0.05, torch.zeros_like(f), f)
    assert torch.allclose(g.intensities[0].double(), (0.25 * f.double() + 0.001) * level, rtol=1e-4)
    # isotropic in normalised units, 0.15 / (sampled voxels in the 5^3 window), so between 0.15/125 and 0.15
    s = g.scales[0]
    assert torch.allclose(s, s[:, :1].expand_as(s)) and float(s.max()) <= 0.15 + 1e-6
    assert float(s.min()) >= 0.15 / 125 - 1e-7
    counts = torch.round(0.15 / s[:, 0].double())
    occupied = torch.zeros(low.shape)
    occupied[ijk[:, 0], ijk[:, 1], ijk[:, 2]] = 1
    i, j, k = (int(x) for x in ijk[0])
    box = occupied[max(i - 2, 0):i + 3, max(j - 2, 0):j + 3, max(k - 2, 0):k + 3]
    assert float(counts[0]) == float(box.sum())
    # the top 15% by gradient are skipped: the sampled voxels' gradients are all below that quantile
    z = low / level
    z = torch.where(z < 0.05, torch.zeros_like(z), z)
    c = z[1:-1, 1:-1, 1:-1]
    grad = torch.zeros_like(z)
    grad[1:-1, 1:-1, 1:-1] = ((c - z[1:-1, 1:-1, 2:]) ** 2 + (c - z[1:-1, 2:, 1:-1]) ** 2
                              + (c - z[2:, 1:-1, 1:-1]) ** 2).sqrt()
    top = torch.sort(grad.flatten(), descending=True).values[int(0.15 * total) - 1]
    assert float(grad[ijk[:, 0], ijk[:, 1], ijk[:, 2]].max()) <= float(top) + 1e-7
