"""PSNR and 3D SSIM against slow obvious references."""
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from medgmae_core.recon.metrics import psnr, ssim


def _ssim_reference(x: np.ndarray, y: np.ndarray, data_range: float, sigma: float = 1.5) -> float:
    """Wang et al. with scipy's gaussian_filter (truncate 3.5), cropped to the valid region."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    f = lambda a: ndimage.gaussian_filter(a, sigma, truncate=3.5, mode="reflect")  # noqa: E731
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    pad = int(3.5 * sigma + 0.5)
    return float(s[pad:-pad, pad:-pad, pad:-pad].mean())


def test_psnr_matches_definition_and_states_range():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(12, 10, 8, generator=g, dtype=torch.float64) * 2.0
    noisy = ref + 0.05 * torch.randn(ref.shape, generator=g, dtype=torch.float64)
    mse = float(((noisy - ref) ** 2).mean())
    rng = float(ref.max() - ref.min())
    assert psnr(noisy, ref) == pytest.approx(10 * math.log10(rng ** 2 / mse), rel=1e-12)
    assert psnr(noisy, ref, data_range=1.0) == pytest.approx(10 * math.log10(1.0 / mse), rel=1e-12)
    assert psnr(ref, ref) == math.inf
    assert psnr(noisy[None], ref) == psnr(noisy, ref)  # [1, D, H, W] accepted


def test_ssim_matches_scipy_reference():
    rs = np.random.default_rng(1)
    x = ndimage.gaussian_filter(rs.random((20, 18, 16)), 2.0)
    y = x + 0.02 * rs.standard_normal(x.shape)
    rng = float(x.max() - x.min())
    assert ssim(torch.from_numpy(y), torch.from_numpy(x)) == pytest.approx(_ssim_reference(y, x, rng), abs=1e-9)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    assert ssim(y, x) < 0.99
    # thin volumes still get a score; slicewise mode is a different (2D) average
    assert 0 < ssim(y[:, :, :4], x[:, :, :4]) < 1
    assert ssim(y, x, slicewise=True) != pytest.approx(ssim(y, x), abs=1e-6)


def test_metrics_reject_bad_inputs():
    a = torch.zeros(4, 4, 4)
    with pytest.raises(ValueError, match="does not match"):
        psnr(a, torch.zeros(4, 4, 5))
    with pytest.raises(ValueError, match="data_range"):
        psnr(a + 1, a)  # constant reference and no explicit range
    with pytest.raises(ValueError, match="volume"):
        ssim(torch.zeros(4, 4), torch.zeros(4, 4))
