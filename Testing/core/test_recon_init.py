"""Initialisations: the 3DGR-CT FBP heuristic, random, and zero-shot MedGMAE through sliding windows
(with a known-answer stand-in for the model, so positions and units can be checked exactly)."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medgmae_core.gaussians import GaussianSet
from medgmae_core.recon.initialisation import (calibrate_intensities, fbp_to_window, gradient_magnitude,
                                               init_fbp, init_medgmae, init_random, initialise, model_grid_shape)
from medgmae_core.recon.io import MU_WATER, hu_to_mu, load_ct_volume


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
