"""spatial.py: normalised <-> voxel <-> RAS maps and window <-> volume Gaussian maps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medgmae_core import spatial
from medgmae_core.gaussians import GaussianSet
from medgmae_core.render import render_volume


def oblique_lps_affine() -> np.ndarray:
    """An oblique affine with anisotropic spacing and LPS-style flips (det < 0)."""
    theta = 0.3
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    tilt = np.array([[1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)], [0, np.sin(0.2), np.cos(0.2)]])
    a = np.eye(4)
    a[:3, :3] = np.diag([-1, -1, 1]) @ rot @ tilt @ np.diag([0.8, 0.9, 2.5])
    a[:3, 3] = [12.0, -40.0, 77.0]
    return a


AFFINES = {"identity_ras": np.diag([1.5, 1.5, 1.5, 1.0]), "oblique_lps": oblique_lps_affine()}


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_point_maps_round_trip_and_match_manual(name):
    a = AFFINES[name]
    shape = (20, 31, 9)
    ijk = np.array([[0, 0, 0], [19, 30, 8], [3.5, 7.25, 2.0]])
    ras = spatial.voxel_to_ras(ijk, a)
    manual = (a @ np.c_[ijk, np.ones(3)].T).T[:, :3]
    np.testing.assert_allclose(ras, manual, atol=1e-12)
    np.testing.assert_allclose(spatial.ras_to_voxel(ras, a), ijk, atol=1e-10)
    norm = spatial.voxel_to_normalised(ijk, shape)
    np.testing.assert_allclose(norm[1], [1, 1, 1])
    np.testing.assert_allclose(spatial.normalised_to_ras(norm, shape, a), ras, atol=1e-10)
    # torch in, torch out
    t = spatial.normalised_to_ras(torch.from_numpy(norm), shape, a)
    assert isinstance(t, torch.Tensor)
    np.testing.assert_allclose(t.numpy(), ras, atol=1e-10)


def test_bad_inputs_name_the_parameter():
    with pytest.raises(ValueError, match="ijk_to_ras"):
        spatial.voxel_to_ras(np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="singular"):
        spatial.voxel_to_ras(np.zeros(3), np.diag([1, 0, 1, 1]))
    with pytest.raises(ValueError, match="window_shape"):
        spatial.window_to_volume(GaussianSet.random(1, 2), (0, 0, 0), (1, 4, 4), (8, 8, 8))


def _small_gaussians(k: int, seed: int) -> GaussianSet:
    g = torch.Generator().manual_seed(seed)
    return GaussianSet.random(1, k, sigma_range=(0.08, 0.2), generator=g, dtype=torch.float64)


@pytest.mark.parametrize("offset", [(5, 7, 3), (-4, 2, 9)])
def test_window_to_volume_matches_render_of_the_cropped_region(offset):
    """Rendering a window's Gaussians on the window grid equals rendering the mapped set on the volume grid."""
    window, volume = (12, 10, 14), (30, 25, 24)
    gs = _small_gaussians(6, seed=1)
    in_window = render_volume(gs, window, cutoff=None, backend="reference")[0]
    mapped = spatial.window_to_volume(gs, offset, window, volume)
    in_volume = render_volume(mapped, volume, cutoff=None, backend="reference")[0]
    # the part of the window that lies inside the volume
    lo = [max(0, -o) for o in offset]
    hi = [min(n, N - o) for n, N, o in zip(window, volume, offset)]
    w_sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    v_sl = tuple(slice(a + o, b + o) for a, b, o in zip(lo, hi, offset))
    np.testing.assert_allclose(in_volume[v_sl].numpy(), in_window[w_sl].numpy(), atol=1e-10)
    assert float(in_window[w_sl].abs().max()) > 0.1  # the comparison is not between two empty volumes


def test_volume_to_window_inverts_window_to_volume():
    gs = _small_gaussians(5, seed=2)
    there = spatial.window_to_volume(gs, (3, -2, 8), (96, 96, 96), (274, 180, 301))
    back = spatial.volume_to_window(there, (3, -2, 8), (96, 96, 96), (274, 180, 301))
    np.testing.assert_allclose(back.centres, gs.centres, atol=1e-12)
    np.testing.assert_allclose(back.covariances(), gs.covariances(), atol=1e-12)
    assert torch.equal(back.intensities, gs.intensities)


def test_isotropic_map_keeps_quaternions_exactly():
    gs = _small_gaussians(4, seed=3)
    out = spatial.window_to_volume(gs, (0, 0, 0), (11, 11, 11), (21, 21, 21))
    assert torch.equal(out.quaternions, gs.quaternions)
    np.testing.assert_allclose(out.scales, gs.scales / 2)


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_gaussians_to_world_mahalanobis_is_invariant(name):
    """For random RAS points, the Mahalanobis distance with the RAS covariance (axes axes^T) equals the one
    computed in normalised coords after mapping the points back: the world map is exact for oblique/LPS."""
    a, shape = AFFINES[name], (40, 33, 17)
    gs = _small_gaussians(7, seed=4)
    centres_ras, axes_ras = spatial.gaussians_to_world(gs, shape, a)
    assert centres_ras.shape == (7, 3) and axes_ras.shape == (7, 3, 3)
    manual = spatial.normalised_to_ras(gs.centres[0].numpy(), shape, a)
    np.testing.assert_allclose(centres_ras, manual, atol=1e-9)
    cov_ras = axes_ras @ axes_ras.transpose(0, 2, 1)
    rng = np.random.default_rng(0)
    pts = centres_ras[:, None, :] + rng.normal(scale=5.0, size=(7, 50, 3))  # [k, P, 3]
    d_ras = pts - centres_ras[:, None]
    m_ras = np.einsum("kpi,kij,kpj->kp", d_ras, np.linalg.inv(cov_ras), d_ras)
    d_norm = spatial.ras_to_normalised(pts, shape, a) - gs.centres[0].numpy()[:, None]
    m_norm = np.einsum("kpi,kij,kpj->kp", d_norm, gs.precisions()[0].numpy(), d_norm)
    np.testing.assert_allclose(m_ras, m_norm, rtol=1e-8)


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_world_round_trip(name):
    a, shape = AFFINES[name], (64, 50, 20)
    gs = _small_gaussians(9, seed=5)
    centres_ras, axes_ras = spatial.gaussians_to_world(gs, shape, a)
    back = spatial.world_to_gaussians(centres_ras, axes_ras, gs.intensities[0].numpy(), shape, a,
                                      dtype=torch.float64)
    np.testing.assert_allclose(back.centres, gs.centres, atol=1e-10)
    np.testing.assert_allclose(back.covariances(), gs.covariances(), atol=1e-12)
    assert torch.all(torch.linalg.det(back.rotations()) > 0)
    scales, quats = spatial.world_axes_to_scales_quaternions(axes_ras)
    rebuilt = spatial.world_scales_quaternions_to_axes(scales, quats)
    np.testing.assert_allclose(rebuilt @ rebuilt.transpose(0, 2, 1), axes_ras @ axes_ras.transpose(0, 2, 1),
                               atol=1e-9)


def test_resampled_affine_keeps_corner_voxels():
    a = oblique_lps_affine()
    old, new = (101, 80, 30), (55, 48, 50)
    b = spatial.resampled_affine(a, old, new)
    corners_new = np.array([[0, 0, 0], [54, 47, 49]])
    corners_old = np.array([[0, 0, 0], [100, 79, 29]])
    np.testing.assert_allclose(spatial.voxel_to_ras(corners_new, b), spatial.voxel_to_ras(corners_old, a), atol=1e-9)
