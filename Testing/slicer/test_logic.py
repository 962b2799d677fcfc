"""The module logic on a real MRML scene (slicer-core): mask, predict, glyphs in RAS, display, export, .mrb, 3D view."""
from __future__ import annotations

import numpy as np
import pytest

from MedGMAESlicerLib.headless import load_mrb
from MedGMAESlicerLib.logic import MedGMAELogic, add_volume, array_ijk, ijk_to_ras, patch_mask
from MedGMAESlicerLib.selftest import BlobFinder, blob_volume, oblique_lps_affine, run_self_tests


# ----------------------------------------------------------------------------- helpers
def _composites(scene):
    return [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]


# ----------------------------------------------------------------------------- mask
def test_mask_preview_on_real_ct(session, small_real_ct):
    ct = session.load_volume(small_real_ct)
    logic = MedGMAELogic(session.scene)
    original = array_ijk(ct).copy()
    preview = logic.preview_mask(ct, mask_ratio=0.6, patch_size=12, seed=3)
    masked, label = array_ijk(preview.masked_node), array_ijk(preview.label_node)
    hidden = preview.mask.astype(bool)
    assert masked.shape == label.shape == original.shape
    assert np.all(masked[hidden] == original.min()) and np.array_equal(masked[~hidden], original[~hidden])
    assert np.array_equal(label, preview.mask) and set(np.unique(label)) == {0, 1}
    grid = patch_mask(original.shape, 12, 0.6, 3)
    assert grid.sum() == round(grid.size * 0.6)  # the model's masking: exactly round(L * ratio) patches hidden
    assert np.allclose(ijk_to_ras(preview.label_node), ijk_to_ras(ct))
    assert preview.label_node.IsA("vtkMRMLLabelMapVolumeNode")
    comp = _composites(session.scene)[0]
    assert comp.GetBackgroundVolumeID() == preview.masked_node.GetID() and comp.GetLabelVolumeID() == preview.label_node.GetID()
    # same seed, same mask; a new seed updates the same nodes with a different mask
    assert np.array_equal(patch_mask(original.shape, 12, 0.6, 3), grid)
    again = logic.preview_mask(ct, mask_ratio=0.6, patch_size=12, seed=4)
    assert again.masked_node is preview.masked_node and not np.array_equal(again.mask, hidden)
    with pytest.raises(ValueError, match="parameter maskRatio"):
        logic.preview_mask(ct, mask_ratio=1.2)


# ----------------------------------------------------------------------------- predict
def test_glyph_centres_land_at_ras_positions_for_oblique_lps_volume(session):
    from medgmae_core.export.glyphs import glyph_vertices

    affine = oblique_lps_affine()
    centre_ijk = np.array([25.0, 12.0, 9.0])
    volume = add_volume(session.scene, blob_volume(centre=centre_ijk), affine, "oblique")
    truth_ras = affine[:3, :3] @ centre_ijk + affine[:3, 3]
    logic = MedGMAELogic(session.scene)
    model = BlobFinder()
    p = logic.predict(volume, model=model, mode="point", point_ras=truth_ras + [4.0, -3.0, 2.0])
    # the table, the glyph model and the Gaussian all put the blob where IJKToRAS says it is
    assert p.centres_ras.shape == (1, 3)
    assert np.linalg.norm(p.centres_ras[0] - truth_ras) < 1.0, (p.centres_ras[0], truth_ras)
    verts = glyph_vertices(p.model_node.GetPolyData(), resolution=p.glyph.resolution)  # [1, points, 3]
    assert np.allclose(verts.mean(1)[0], p.centres_ras[0], atol=1e-3)
    table = p.table_node.GetTable()
    row = [table.GetValueByName(0, c).ToDouble() for c in ("R (mm)", "A (mm)", "S (mm)")]
    assert np.allclose(row, p.centres_ras[0], atol=1e-4)
    # isotropic window scale -> isotropic RAS radius: sigma * scale * (n - 1) * 1.5 mm (model spacing)
    radius = np.linalg.norm(verts[0] - verts.mean(1)[0], axis=1)
    assert np.allclose(radius, 2 * 0.03 * 31 * 1.5, rtol=1e-3)
    # the rendered window sits where the blob is: its brightest voxel maps back near the truth
    pred = array_ijk(p.prediction_node)
    peak = np.array(np.unravel_index(np.argmax(pred), pred.shape), float)
    peak_ras = ijk_to_ras(p.prediction_node)[:3, :3] @ peak + ijk_to_ras(p.prediction_node)[:3, 3]
    assert np.linalg.norm(peak_ras - truth_ras) < 1.6


def test_predict_on_real_ct_with_tiny_checkpoint(session, small_real_ct, tiny_checkpoint):
    ct = session.load_volume(small_real_ct)
    logic = MedGMAELogic(session.scene)
    centre = ijk_to_ras(ct) @ np.array([60, 50, 15, 1.0])
    p = logic.predict(ct, checkpoint=tiny_checkpoint, mode="point", point_ras=centre[:3], mask_ratio=0.75, seed=1)
    n = len(p.intensities)
    assert n > 0 and p.table_node.GetNumberOfRows() == n and p.table_node.GetNumberOfColumns() == 12
    shown = int((p.intensities >= p.glyph.threshold * p.intensities.max()).sum())
    assert 0 < shown <= n
    per_glyph = 50  # sphere at resolution 8
    assert p.model_node.GetPolyData().GetNumberOfPoints() == shown * per_glyph
    comp = _composites(session.scene)[0]
    assert comp.GetForegroundVolumeID() == p.prediction_node.GetID() and comp.GetBackgroundVolumeID() == ct.GetID()
    assert array_ijk(p.prediction_node).shape == (32, 32, 32)
    # the status is a sentence; the timings are in the log, not in it
    status = logic.status_text()
    assert status.startswith(f"{n} Gaussians predicted over one model window around the chosen point. "
                             f"{shown} are drawn as ellipsoids at 2 standard deviations")
    assert " s," not in status and "Timings" not in status and set(p.timings.values) >= {"predict", "show"}
    # same seed, same mask, same Gaussians; the nodes are reused
    again = logic.predict(ct, checkpoint=tiny_checkpoint, mode="point", point_ras=centre[:3], mask_ratio=0.75, seed=1)
    assert np.allclose(again.centres_ras, p.centres_ras) and again.model_node is p.model_node


def test_display_controls(session, tiny_checkpoint):
    volume = add_volume(session.scene, blob_volume(), oblique_lps_affine(), "blob")
    logic = MedGMAELogic(session.scene)
    p = logic.predict(volume, checkpoint=tiny_checkpoint, mode="point")
    logic.update_display(threshold=0.0, resolution=8, sigma=1, opacity=0.3)
    poly = p.model_node.GetPolyData()
    n = len(p.intensities)
    assert n >= 13 and poly.GetNumberOfPoints() == n * 50 and p.model_node.GetDisplayNode().GetOpacity() == pytest.approx(0.3)
    from medgmae_core.export.glyphs import glyph_vertices
    one_sigma = glyph_vertices(poly, 8)
    logic.update_display(sigma=3)
    three_sigma = glyph_vertices(p.model_node.GetPolyData(), 8)
    c = one_sigma.mean(1, keepdims=True)
    assert np.allclose(three_sigma - c, 3 * (one_sigma - c), atol=1e-4)
    logic.update_display(resolution=12)
    assert p.model_node.GetPolyData().GetNumberOfPoints() == n * (12 * 10 + 2)
    ordered = np.sort(p.intensities)
    cut = float(ordered[-13] + ordered[-12]) / 2  # between two intensities: the 12 strongest stay
    logic.update_display(threshold=cut / ordered[-1])  # a fraction of the strongest
    assert p.model_node.GetPolyData().GetNumberOfPoints() == 12 * (12 * 10 + 2) and p.shown == 12
    # the overlay opacity changes only in the views that show this prediction
    other = add_volume(session.scene, blob_volume(), np.eye(4), "other")
    red, yellow, green = _composites(session.scene)
    yellow.SetForegroundVolumeID(other.GetID())
    yellow.SetForegroundOpacity(0.25)
    logic.update_display(prediction_opacity=0.7)
    assert red.GetForegroundOpacity() == pytest.approx(0.7) and green.GetForegroundOpacity() == pytest.approx(0.7)
    assert yellow.GetForegroundOpacity() == pytest.approx(0.25)


def test_whole_volume_prediction(session, tiny_checkpoint):
    volume = add_volume(session.scene, blob_volume(), oblique_lps_affine(), "blob")
    logic = MedGMAELogic(session.scene)
    steps = []
    p = logic.predict(volume, checkpoint=tiny_checkpoint, mode="whole", progress=lambda f, t="": steps.append(f))
    from medgmae_core import inference, spatial
    prepared = inference.prepare_ct(array_ijk(volume), ijk_to_ras(volume))
    assert array_ijk(p.prediction_node).shape == prepared.shape
    assert np.allclose(ijk_to_ras(p.prediction_node), prepared.ijk_to_ras)
    assert steps == sorted(steps) and steps[-1] == 1.0 and len(steps) > 4
    # every merged Gaussian centre lies inside the prepared grid (partition cells tile it)
    vox = spatial.ras_to_voxel(p.centres_ras, prepared.ijk_to_ras)
    assert len(vox) > 0 and np.all(vox > -1.0) and np.all(vox < np.asarray(prepared.shape))
    assert f"over the whole volume ({p.windows} overlapping windows)" in logic.status_text() and p.windows > 1
    # Cancel from the progress callback (the panel's Cancel button): stops between windows, scene unchanged
    from MedGMAESlicerLib.logic import PredictionCancelled
    nodes = session.scene.GetNumberOfNodes()
    seen = []
    with pytest.raises(PredictionCancelled):
        logic.predict(volume, checkpoint=tiny_checkpoint, mode="whole", seed=1,
                      progress=lambda f, t="": seen.append(t) or t.startswith("window 2 of"))
    assert seen[-1].startswith("window 2 of") and session.scene.GetNumberOfNodes() == nodes
    assert logic.last_prediction is p


# ----------------------------------------------------------------------------- export, scene, 3D view
def test_export_mrb_round_trip_and_3d_view(session, small_real_ct, tiny_checkpoint, tmp_path):
    from medgmae_core.export.nifti import read_volume_array
    from medgmae_core.export.ply import read_gaussians_ply

    ct = session.load_volume(small_real_ct)
    logic = MedGMAELogic(session.scene)
    logic.preview_mask(ct, seed=5)
    p = logic.predict(ct, checkpoint=tiny_checkpoint, mode="point", mask_ratio=0.5)
    logic.update_display(threshold=0.0)
    # exports
    ply = logic.export_ply(tmp_path / "g.ply")
    back = read_gaussians_ply(ply)
    from medgmae_core import spatial
    assert back.coords == "ras" and np.allclose(back.ijk_to_ras, p.grid_affine)
    back_ras, _ = spatial.gaussians_to_world(back.gaussians, back.shape, back.ijk_to_ras)
    assert np.allclose(back_ras, p.centres_ras, atol=1e-3)
    nii, mask_nii = logic.export_nifti(tmp_path / "pred.nii.gz", mask_path=tmp_path / "mask.nii.gz")
    arr, aff = read_volume_array(nii)
    assert np.allclose(arr, array_ijk(p.prediction_node), atol=1e-3) and np.allclose(aff, ijk_to_ras(p.prediction_node), atol=1e-4)
    marr, _ = read_volume_array(mask_nii)
    assert np.array_equal(marr, logic.last_mask.mask)
    # .mrb: save, reload in a new scene, nodes and arrays survive
    mrb = session.save_mrb(tmp_path / "scene.mrb")
    scene2 = load_mrb(mrb)
    for node in (ct, logic.last_mask.masked_node, logic.last_mask.label_node, p.prediction_node):
        copy = scene2.GetFirstNodeByName(node.GetName())
        assert copy is not None and copy.GetClassName() == node.GetClassName(), node.GetName()
        import slicer
        assert np.array_equal(slicer.util.arrayFromVolume(copy), slicer.util.arrayFromVolume(node)), node.GetName()
        assert np.allclose(ijk_to_ras(copy), ijk_to_ras(node))
    model2 = scene2.GetFirstNodeByName(p.model_node.GetName())
    from vtk.util.numpy_support import vtk_to_numpy
    assert np.allclose(vtk_to_numpy(model2.GetPolyData().GetPoints().GetData()),
                       vtk_to_numpy(p.model_node.GetPolyData().GetPoints().GetData()), atol=1e-4)
    table2 = scene2.GetFirstNodeByName(p.table_node.GetName())
    assert table2.GetNumberOfRows() == len(p.intensities)
    assert float(table2.GetTable().GetValueByName(3, "intensity").ToDouble()) == pytest.approx(p.intensities[3], rel=1e-5)
    # offscreen 3D view of the glyphs: not blank
    png = tmp_path / "view.png"
    rgb = session.render_3d(png)
    background = rgb[0, 0].astype(int)
    differs = np.abs(rgb.astype(int) - background).sum(-1) > 30
    assert png.stat().st_size > 1000 and differs.mean() > 0.01, differs.mean()


def test_module_self_tests_run_headless(session):
    """What the module's Test class runs inside Slicer, here on slicer-core."""
    messages = []
    run_self_tests(session.scene, report=messages.append)
    assert messages[0] == "mask preview OK" and "glyph lands" in messages[1]
    assert "Gaussians predicted over one model window" in messages[3]
    assert messages[4].startswith("background prediction OK")
    assert messages[-2] == "parameters round trip OK" and messages[-1].startswith("background job")


def test_window_follows_the_newest_point(session):
    """With several points in the list, the window is centred on the one placed last."""
    from MedGMAESlicerLib.parameters import MedGMAEParameters

    volume = add_volume(session.scene, blob_volume(), oblique_lps_affine(), "blob")
    points = session.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "centre")
    logic = MedGMAELogic(session.scene)
    params = MedGMAEParameters(inputVolume=volume, windowPoint=points)
    assert logic.window_point_ras(params) is None  # no point yet: the volume centre
    points.AddControlPoint([1.0, 2.0, 3.0])
    points.AddControlPoint([10.0, 20.0, 30.0])
    assert logic.window_point_ras(params) == pytest.approx([10.0, 20.0, 30.0])
    assert logic.request_from_parameters(params).point_ras == pytest.approx((10.0, 20.0, 30.0))
    assert logic.window_point_ras(MedGMAEParameters(inputVolume=volume, windowPoint=points, windowMode="whole")) is None


def test_prediction_request_round_trip(tmp_path):
    """What the panel hands to the prediction process is what the process reads."""
    from MedGMAESlicerLib.prediction import PredictionRequest

    hu = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    request = PredictionRequest(hu, oblique_lps_affine(), checkpoint="/w/c.pt", mode="whole", point_ras=[1, 2, 3],
                                mask_ratio=0.5, seed=7, device="cpu")
    back = PredictionRequest.load(request.save(tmp_path / "r.npz"))
    assert np.array_equal(back.hu, hu) and np.allclose(back.ijk_to_ras, oblique_lps_affine())
    assert (back.checkpoint, back.mode, back.point_ras, back.mask_ratio, back.seed, back.device) == \
        ("/w/c.pt", "whole", (1.0, 2.0, 3.0), 0.5, 7, "cpu")
    with pytest.raises(ValueError, match="window mode"):
        PredictionRequest(hu, np.eye(4), mode="half")


def test_prediction_uses_medgmae_cores_public_functions(monkeypatch, session, tiny_checkpoint):
    """The module predicts through medgmae_core.inference's own functions (whatever masking policy they apply):
    it passes the mask ratio and generator and nothing that would override their choices."""
    from medgmae_core import inference

    calls = []
    real_window, real_volume = inference.predict_window, inference.predict_volume

    def spy_window(*args, **kwargs):
        calls.append(("predict_window", sorted(kwargs)))
        return real_window(*args, **kwargs)

    def spy_volume(*args, **kwargs):
        calls.append(("predict_volume", sorted(kwargs)))
        return real_volume(*args, **kwargs)

    monkeypatch.setattr(inference, "predict_window", spy_window)
    monkeypatch.setattr(inference, "predict_volume", spy_volume)
    volume = add_volume(session.scene, blob_volume(), oblique_lps_affine(), "blob")
    logic = MedGMAELogic(session.scene)
    logic.predict(volume, checkpoint=tiny_checkpoint, mode="point", mask_ratio=0.5)
    logic.predict(volume, checkpoint=tiny_checkpoint, mode="whole", mask_ratio=0.5)
    assert calls == [("predict_window", ["centre_ras", "generator", "mask_ratio"]),
                     ("predict_volume", ["generator", "mask_ratio", "progress"])]  # no stitch: its one mask
    # would bypass the library's inference mask policy
    import inspect
    source = inspect.getsource(__import__("MedGMAESlicerLib.prediction", fromlist=["x"]))
    assert "mask_policy" not in source  # the library's default policy, never one hard-coded here
