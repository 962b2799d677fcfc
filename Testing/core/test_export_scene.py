"""export/slicer_scene.py (.mrb through slicer-core) and export/figures.py (PNG overview, ellipse sections)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("slicer")
from vtk.util import numpy_support as ns  # noqa: E402

from medgmae_core import spatial  # noqa: E402
from medgmae_core.export import figures, glyphs, slicer_scene  # noqa: E402
from medgmae_core.gaussians import GaussianSet  # noqa: E402


def _affine() -> np.ndarray:
    a = np.diag([-1.5, -1.5, 2.0, 1.0])
    a[:3, 3] = [60.0, 40.0, -20.0]
    return a


def test_mrb_round_trip_keeps_nodes_arrays_and_geometry(tmp_path):
    rng = np.random.default_rng(0)
    ct = rng.normal(0, 300, (20, 18, 12)).astype(np.float32)
    mask = (rng.uniform(size=(10, 9, 6)) > 0.5).astype(np.uint8)
    pred = rng.normal(0, 100, (10, 9, 6)).astype(np.float32)
    coarse = _affine() @ np.diag([2.0, 2.0, 2.0, 1.0])
    gs = GaussianSet.random(1, 30, generator=torch.Generator().manual_seed(0))
    centres, axes = spatial.gaussians_to_world(gs, (10, 9, 6), coarse)
    poly = glyphs.gaussian_glyph_polydata(centres, axes, gs.intensities[0].numpy(), resolution=6)
    path = slicer_scene.write_scene(tmp_path / "s.mrb", ct=(ct, _affine()), mask=(mask, coarse),
                                    prediction=(pred, coarse), glyphs=poly)
    scene = slicer_scene.read_scene(path).scene
    ct_node = scene.GetFirstNodeByName("CT")
    np.testing.assert_array_equal(slicer_scene.volume_array(ct_node), ct)
    np.testing.assert_allclose(slicer_scene.node_ijk_to_ras(ct_node), _affine(), atol=1e-6)
    mask_node = scene.GetFirstNodeByName("MedGMAE mask")
    assert mask_node.IsA("vtkMRMLLabelMapVolumeNode")
    np.testing.assert_array_equal(slicer_scene.volume_array(mask_node), mask)
    pred_node = scene.GetFirstNodeByName("MedGMAE prediction")
    np.testing.assert_allclose(slicer_scene.volume_array(pred_node), pred)
    np.testing.assert_allclose(slicer_scene.node_ijk_to_ras(pred_node), coarse, atol=1e-6)
    model = scene.GetFirstNodeByName("MedGMAE Gaussians")
    loaded = model.GetPolyData()
    assert loaded.GetNumberOfPoints() == poly.GetNumberOfPoints() == 30 * glyphs.glyph_counts(6)[0]
    np.testing.assert_allclose(ns.vtk_to_numpy(loaded.GetPoints().GetData()),
                               ns.vtk_to_numpy(poly.GetPoints().GetData()), atol=1e-3)  # RAS survives LPS files
    display = model.GetDisplayNode()
    assert display.GetScalarVisibility() and display.GetActiveScalarName() == "intensity"
    assert display.GetVisibility2D()  # outlines in slice views
    comp = scene.GetNthNodeByClass(0, "vtkMRMLSliceCompositeNode")
    assert comp.GetBackgroundVolumeID() == ct_node.GetID() and comp.GetLabelVolumeID() == mask_node.GetID()


def test_scene_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match=".mrb"):
        slicer_scene.write_scene(tmp_path / "s.zip")
    with pytest.raises(FileNotFoundError):
        slicer_scene.read_scene(tmp_path / "none.mrb")
    (tmp_path / "bad.mrb").write_text("x")
    with pytest.raises(ValueError, match="bad.mrb"):
        slicer_scene.read_scene(tmp_path / "bad.mrb")


def test_slice_ellipses_are_exact_cross_sections():
    gs = GaussianSet.random(1, 40, generator=torch.Generator().manual_seed(1), sigma_range=(0.05, 0.2),
                            dtype=torch.float64)
    shape = (30, 40, 20)
    centres, cov, _ = figures.voxel_gaussians(gs, shape)
    for axis in range(3):
        index = shape[axis] / 2
        keep, centre, widths, heights, angles = figures.slice_ellipses(centres, cov, axis, index, sigma=2.0)
        assert keep.any() and not keep.all()
        b = [a for a in range(3) if a != axis]
        t = np.linspace(0, 2 * np.pi, 16)
        th = np.radians(angles)[:, None]
        u = centre[:, :1] + widths[:, None] / 2 * np.cos(t) * np.cos(th) - heights[:, None] / 2 * np.sin(t) * np.sin(th)
        v = centre[:, 1:] + widths[:, None] / 2 * np.cos(t) * np.sin(th) + heights[:, None] / 2 * np.sin(t) * np.cos(th)
        pts = np.zeros(u.shape + (3,))
        pts[..., axis], pts[..., b[0]], pts[..., b[1]] = index, u, v
        d = pts - centres[keep][:, None]
        maha = np.einsum("npi,nij,npj->np", d, np.linalg.inv(cov[keep]), d)
        np.testing.assert_allclose(maha, 4.0, rtol=1e-8)  # boundary points sit on the 2-sigma ellipsoid
        far = np.abs(index - centres[:, axis]) > 2 * np.sqrt(cov[:, axis, axis])
        assert not (keep & far).any()


def test_overview_png_has_slices_outlines_and_a_3d_view(tmp_path):
    import matplotlib.image as mpimg

    shape = (40, 36, 24)
    gs = GaussianSet.random(1, 50, generator=torch.Generator().manual_seed(2), sigma_range=(0.04, 0.1))
    ct = torch.rand(shape)
    mask = (torch.rand(shape) > 0.5).float()
    centres, axes = spatial.gaussians_to_world(gs, shape, np.diag([1.5, 1.5, 1.5, 1.0]))
    poly = glyphs.gaussian_glyph_polydata(centres, axes, gs.intensities[0].numpy())
    rgb = figures.render_glyphs_offscreen(poly, size=(200, 160))
    assert rgb.shape == (160, 200, 3)
    background = np.array([0.08, 0.08, 0.1]) * 255
    assert (np.abs(rgb.astype(float) - background).sum(-1) > 30).mean() > 0.05  # glyphs cover part of the view
    path = figures.overview_png(tmp_path / "o.png", ct=ct, prediction=ct * 0.5, mask=mask, gaussians=gs,
                                glyph_polydata=poly, title="test")
    img = mpimg.imread(path)
    assert img.shape[0] > 500 and img.shape[1] > 1000
    assert img[..., :3].std() > 0.1


def test_overview_falls_back_to_a_scatter_without_offscreen_gl(tmp_path, monkeypatch, caplog):
    import logging

    monkeypatch.setattr(figures, "offscreen_gl_available", lambda: False)
    shape = (20, 18, 12)
    gs = GaussianSet.random(1, 10, generator=torch.Generator().manual_seed(4))
    centres, axes = spatial.gaussians_to_world(gs, shape, np.eye(4))
    poly = glyphs.gaussian_glyph_polydata(centres, axes, gs.intensities[0].numpy())
    with caplog.at_level(logging.WARNING, logger="medgmae_core.export.figures"):
        path = figures.overview_png(tmp_path / "o.png", ct=torch.rand(shape), gaussians=gs, glyph_polydata=poly)
    assert path.is_file() and "falls back" in caplog.text
