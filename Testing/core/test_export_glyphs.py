"""export/glyphs.py: one ellipsoid per Gaussian whose axes are R diag(scale) * sigma."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("vtk")
from vtk.util import numpy_support as ns  # noqa: E402

from medgmae_core import spatial  # noqa: E402
from medgmae_core.export import glyphs  # noqa: E402
from medgmae_core.gaussians import GaussianSet  # noqa: E402


def _template(resolution: int) -> np.ndarray:
    return ns.vtk_to_numpy(glyphs.sphere_source(resolution).GetOutput().GetPoints().GetData()).astype(np.float64)


def _fitted_axes(poly, centres: np.ndarray, resolution: int) -> np.ndarray:
    """Least-squares linear map from the template sphere to each glyph's vertices: ``[n, 3, 3]``."""
    verts = glyphs.glyph_vertices(poly, resolution).astype(np.float64) - centres[:, None, :]  # [n, m, 3]
    pinv = np.linalg.pinv(_template(resolution))  # [3, m]
    return (pinv @ verts).transpose(0, 2, 1)  # verts = u @ M^T  ->  M^T = pinv @ verts


@pytest.mark.parametrize("sigma,count", [(1.0, 500), (2.0, 20000), (3.0, 500)])
def test_20k_glyphs_one_ellipsoid_each_with_axes_r_diag_s_sigma(sigma, count):
    gs = GaussianSet.random(1, count, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    centres = gs.centres[0].numpy() * 100.0
    axes = (gs.rotations() * gs.scales[..., None, :])[0].numpy() * 100.0  # R diag(s), in "mm"
    poly = glyphs.gaussian_glyph_polydata(centres, axes, gs.intensities[0].numpy(), sigma=sigma, resolution=8)
    per_points, per_cells = glyphs.glyph_counts(8)
    assert (per_points, per_cells) == (50, 96)
    assert poly.GetNumberOfPoints() == count * per_points
    assert poly.GetNumberOfCells() == count * per_cells
    fitted = _fitted_axes(poly, centres, 8)
    np.testing.assert_allclose(fitted, sigma * axes, atol=2e-4 * sigma * 10)  # float32 vertices, ~1e-5 relative
    # every vertex lies on the sigma-ellipsoid: Mahalanobis distance == sigma
    verts = glyphs.glyph_vertices(poly, 8).astype(np.float64) - centres[:, None, :]
    prec = np.linalg.inv(axes @ axes.transpose(0, 2, 1))
    maha = np.sqrt(np.einsum("nmi,nij,nmj->nm", verts, prec, verts))
    np.testing.assert_allclose(maha, sigma, rtol=1e-4)
    # per-point scalars: every vertex of glyph g carries intensity g
    scalars = ns.vtk_to_numpy(poly.GetPointData().GetArray(glyphs.SCALAR_NAME)).reshape(count, per_points)
    np.testing.assert_allclose(scalars, np.repeat(gs.intensities[0].numpy()[:, None], per_points, 1), rtol=1e-6)


@pytest.mark.parametrize("method", ["numpy", "numba"])
def test_fast_paths_equal_vtk_tensor_glyph_reference(method):
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(500, 3)) * 50
    axes = rng.normal(size=(500, 3, 3))  # non-orthogonal, some reflecting (det < 0)
    values = rng.uniform(size=500)
    fast = glyphs.gaussian_glyph_polydata(centres, axes, values, sigma=2, resolution=6, method=method)
    ref = glyphs.gaussian_glyph_polydata(centres, axes, values, sigma=2, resolution=6, method="vtk")
    np.testing.assert_allclose(ns.vtk_to_numpy(fast.GetPoints().GetData()),
                               ns.vtk_to_numpy(ref.GetPoints().GetData()), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(ns.vtk_to_numpy(fast.GetPolys().GetConnectivityArray()),
                                  ns.vtk_to_numpy(ref.GetPolys().GetConnectivityArray()))
    np.testing.assert_allclose(ns.vtk_to_numpy(fast.GetPointData().GetNormals()),
                               ns.vtk_to_numpy(ref.GetPointData().GetNormals()), atol=1e-4)
    np.testing.assert_allclose(ns.vtk_to_numpy(fast.GetPointData().GetArray("intensity")),
                               ns.vtk_to_numpy(ref.GetPointData().GetArray("intensity")))


def test_threshold_keeps_only_strong_gaussians():
    centres = np.arange(30, dtype=float).reshape(10, 3)
    axes = np.tile(np.eye(3), (10, 1, 1))
    values = np.linspace(0, 1, 10)
    poly = glyphs.gaussian_glyph_polydata(centres, axes, values, threshold=0.5, resolution=4)
    per = glyphs.glyph_counts(4)[0]
    assert poly.GetNumberOfPoints() == 5 * per
    kept = ns.vtk_to_numpy(poly.GetPointData().GetScalars())
    assert kept.min() >= 0.5 - 1e-6
    empty = glyphs.gaussian_glyph_polydata(centres, axes, values, threshold=2.0)
    assert empty.GetNumberOfPoints() == 0


def test_glyphs_land_at_ras_positions_for_lps_oblique_volume():
    """Glyph centres (vertex means) equal the RAS image of the Gaussian centres through IJKToRAS."""
    a = np.eye(4)
    c, s = np.cos(0.4), np.sin(0.4)
    a[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([0.7, 0.7, 2.0])
    a[:3, 3] = [100.0, 80.0, -30.0]
    shape = (64, 64, 20)
    gs = GaussianSet.random(1, 50, generator=torch.Generator().manual_seed(2), sigma_range=(0.01, 0.03))
    centres_ras, axes_ras = spatial.gaussians_to_world(gs, shape, a)
    poly = glyphs.gaussian_glyph_polydata(centres_ras, axes_ras, gs.intensities[0].numpy(), sigma=1)
    means = glyphs.glyph_vertices(poly).mean(axis=1)
    ijk = gs.centres[0].double().numpy() * (np.array(shape) - 1)
    np.testing.assert_allclose(means, ijk @ a[:3, :3].T + a[:3, 3], atol=1e-3)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="centres_ras"):
        glyphs.gaussian_glyph_polydata(np.zeros((3, 2)), np.zeros((3, 3, 3)))
    with pytest.raises(ValueError, match="axes_ras"):
        glyphs.gaussian_glyph_polydata(np.zeros((3, 3)), np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match="resolution"):
        glyphs.gaussian_glyph_polydata(np.zeros((1, 3)), np.eye(3)[None], resolution=2)
    with pytest.raises(ValueError, match="method"):
        glyphs.gaussian_glyph_polydata(np.zeros((1, 3)), np.eye(3)[None], method="fast")
