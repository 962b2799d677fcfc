"""The viewer's logic without a browser: loading inputs, prediction through the library, thresholds, picking,
slices, export (``medgmae_core.viewer.session`` / ``scene3d``)."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from medgmae_core import cli, inference
from medgmae_core.data.transforms import NotCTError
from medgmae_core.export import ply, slicer_scene
from medgmae_core.export.figures import offscreen_gl_available
from medgmae_core.export.glyphs import glyph_counts
from medgmae_core.export.nifti import read_volume_array
from medgmae_core.viewer import session as vs
from medgmae_core.viewer.session import PredictJob, Thresholds, ViewerSession

PHANTOM = (40, 40, 32)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    from medgmae_core.model import build_model, get_config
    from medgmae_core.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_model(get_config("tiny", img_size=48))
    return save_checkpoint(tmp_path_factory.mktemp("weights") / "tiny48.pt", model=model)


@pytest.fixture(scope="module")
def predicted(tiny_weights):
    s = ViewerSession(phantom_shape=PHANTOM).load(None)
    calls = []
    s.predict(mask_ratio=0.5, weights=tiny_weights, progress=lambda d, n: calls.append((d, n)))
    return s, calls


def _png_array(data: bytes) -> np.ndarray:
    import matplotlib.image as mpimg

    return mpimg.imread(io.BytesIO(data), format="png")


def test_the_package_imports_no_web_stack_outside_the_app():
    code = ("import sys, medgmae_core.viewer.session, medgmae_core.viewer.scene3d, medgmae_core.cli; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('trame', 'trame_vtk', 'trame_server', "
            "'trame_client', 'trame_vuetify', 'aiohttp', 'wslink')); print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_phantom_loads_on_the_model_grid_without_gaussians():
    s = ViewerSession(phantom_shape=PHANTOM).load(None)
    assert s.kind == "phantom" and s.prepared.shape == PHANTOM  # the phantom is already at 1.5 mm
    assert s.gaussians is None and len(s.visible()) == 0
    img = _png_array(s.slice_png("axial"))
    assert img.shape[:2] == (300, 300) and img[..., :3].std() > 0.05  # a real CT slice, not a blank picture


def test_predict_goes_through_the_library_and_reports_progress(tiny_weights, monkeypatch):
    seen = {}
    real = inference.predict_volume

    def spy(model, prepared, **kw):
        seen.update(kw)
        return real(model, prepared, **kw)

    monkeypatch.setattr(inference, "predict_volume", spy)
    s = ViewerSession(phantom_shape=PHANTOM).load(None)
    job = PredictJob(s, mask_ratio=0.5, weights=str(tiny_weights)).start()
    assert job.thread is not threading.current_thread()
    job.wait(120)
    assert job.error is None and not job.running
    assert seen["mask_ratio"] == 0.5 and seen["stitch"] and seen["overlap"] == 0
    assert job.fraction == 1.0 and job.info.gaussians == len(s.gaussians) > 0
    assert s.prediction.shape == s.mask.shape == torch.Size(PHANTOM)
    assert 0.2 < float(s.mask.mean()) < 0.8  # mask ratio 0.5, one padded window


def test_predict_errors_are_reported_by_the_job(tmp_path):
    s = ViewerSession(phantom_shape=PHANTOM).load(None)
    job = PredictJob(s, weights=str(tmp_path / "missing.pt")).start().wait(60)
    assert "checkpoint not found" in job.error and s.gaussians is None
    with pytest.raises(ValueError, match="mask ratio"):
        s.predict(mask_ratio=1.0)


def test_bundled_weights_are_the_one_bundled_checkpoint(tmp_path, monkeypatch):
    from medgmae_core.train import checkpoint

    assert vs.bundled_weights() == checkpoint.BUNDLED_WEIGHTS and checkpoint.BUNDLED_WEIGHTS.is_file()
    monkeypatch.setattr(checkpoint, "BUNDLED_WEIGHTS", tmp_path / "none.pt")
    assert vs.bundled_weights() is None


def test_thresholds_thin_the_glyphs(predicted):
    s, calls = predicted
    assert calls and calls[-1][0] == calls[-1][1]
    g = s.gaussians
    n = len(g)
    poly, keep = s.glyph_polydata()
    assert len(keep) == n and poly.GetNumberOfCells() == n * glyph_counts()[1]
    median = float(np.median(g.intensities))
    s.thresholds = Thresholds(min_intensity=median)
    keep = s.visible()
    assert 0 < len(keep) < n and np.all(g.intensities[keep] >= median)
    assert np.array_equal(keep, np.flatnonzero(g.intensities >= median))
    sizes = g.size_mm
    lo, hi = np.quantile(sizes, [0.25, 0.75])
    s.thresholds = Thresholds(min_size_mm=lo, max_size_mm=hi)
    keep = s.visible()
    assert np.array_equal(keep, np.flatnonzero((sizes >= lo) & (sizes <= hi)))
    poly, _ = s.glyph_polydata()
    assert poly.GetNumberOfCells() == len(keep) * glyph_counts()[1]
    s.thresholds = Thresholds()


def test_slices_show_the_gaussian_outlines(predicted):
    s, _ = predicted
    with_outlines = _png_array(s.slice_png("coronal"))
    s.thresholds = Thresholds(min_intensity=float(s.gaussians.intensities.max()) + 1)  # none visible
    try:
        plain = _png_array(s.slice_png("coronal"))
    finally:
        s.thresholds = Thresholds()
    diff = np.abs(with_outlines[..., :3] - plain[..., :3]).sum(-1)
    assert (diff > 0.1).mean() > 0.01  # coloured ellipse outlines drawn over the CT
    # outlines are coloured (plasma); the CT is grey
    rgb = with_outlines[..., :3]
    assert (np.ptp(rgb, axis=-1) > 0.2).sum() > 100 and (np.ptp(plain[..., :3], axis=-1) > 0.2).sum() == 0


def test_gaussian_parameters(predicted):
    s, _ = predicted
    info = s.gaussian_info(3)
    g = s.gaussians
    np.testing.assert_allclose(info["centre_ras_mm"], g.centres[3], atol=0.01)
    np.testing.assert_allclose(info["sigmas_mm"], np.linalg.norm(g.axes[3], axis=0), atol=0.001)
    assert info["intensity"] == pytest.approx(float(g.intensities[3]), abs=1e-4)
    assert s.nearest(g.centres[3] + 0.01) == 3
    with pytest.raises(IndexError):
        s.gaussian_info(len(g))


@pytest.mark.skipif(not offscreen_gl_available(), reason="no EGL library or X display for offscreen VTK")
def test_3d_view_renders_and_picks_the_gaussian_under_the_mouse(predicted):
    from medgmae_core.viewer.scene3d import Scene3D

    s, _ = predicted
    target = int(np.argmax(s.gaussians.intensities))
    value = float(s.gaussians.intensities[target])
    scene = Scene3D((300, 300))
    scene.set_volume(s.prepared.volume.numpy(), s.prepared.ijk_to_ras)
    s.thresholds = Thresholds(min_intensity=value)  # only the brightest glyph
    try:
        poly, keep = s.glyph_polydata()
        assert list(keep) == [target]
        scene.set_glyphs(poly, keep)
        scene.reset_camera()
        img = scene.screenshot()
        assert img.shape == (300, 300, 3) and img.std() > 5
        x, y = scene.display_position(s.gaussians.centres[target])
        assert scene.pick(x, y) == target
        assert scene.pick(2, 2) is None  # the corner: background
    finally:
        s.thresholds = Thresholds()


def test_export_ply_nifti_mrb(predicted, tmp_path):
    s, _ = predicted
    p = s.export("ply", tmp_path)
    back = ply.read_gaussians_ply(p)
    assert back.coords == "ras" and back.gaussians.num_gaussians == len(s.gaussians)
    from medgmae_core import spatial

    centres, _ = spatial.gaussians_to_world(back.gaussians, back.shape, back.ijk_to_ras)
    np.testing.assert_allclose(np.asarray(centres).reshape(-1, 3), s.gaussians.centres, atol=1e-3)
    vol, affine = read_volume_array(s.export("nifti", tmp_path))
    assert vol.shape == PHANTOM and np.allclose(affine, s.prepared.ijk_to_ras, atol=1e-4)
    assert -200 < vol.min() < vol.max() < 300  # HU, window [-175, 250]
    hs = slicer_scene.read_scene(s.export("mrb", tmp_path))
    names = {hs.scene.GetNthNode(i).GetName() for i in range(hs.scene.GetNumberOfNodes())}
    assert {"CT", "MedGMAE prediction", "MedGMAE Gaussians"} <= names
    model = hs.scene.GetFirstNodeByName("MedGMAE Gaussians")
    assert model.GetPolyData().GetNumberOfCells() == len(s.gaussians) * glyph_counts()[1]
    with pytest.raises(ValueError, match="export kind"):
        s.export("png", tmp_path)


def test_bad_inputs_keep_the_loaded_one(tmp_path):
    s = ViewerSession(phantom_shape=PHANTOM).load(None)
    before = s.prepared
    with pytest.raises(FileNotFoundError, match="not found"):
        s.load(tmp_path / "missing.nii.gz")
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((20, 20, 20)).astype(np.float32), np.eye(4)),
             str(tmp_path / "probability.nii.gz"))
    with pytest.raises(NotCTError):
        s.load(tmp_path / "probability.nii.gz")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(Exception):
        s.load(tmp_path / "notes.txt")
    assert s.prepared is before and s.kind == "phantom"


def test_opens_a_demo_output_folder_and_a_ply(tmp_path, tiny_weights, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--weights", str(tiny_weights), "--phantom-shape", "40,40,32"]) == 0
    capsys.readouterr()
    s = ViewerSession().load(out)
    expected = ply.read_gaussians_ply(out / "gaussians.ply").gaussians.num_gaussians
    assert s.kind == "output folder" and len(s.gaussians) == expected > 0
    from medgmae_core.data.phantom import make_phantom

    assert s.prepared.shape == PHANTOM  # the CT from scene.mrb, not the prediction
    hu = make_phantom(shape=PHANTOM, seed=0).hu
    assert float(s.prepared.volume.std()) > 0.1 and s.hu.shape == hu.shape
    p = ViewerSession().load(out / "gaussians.ply")
    assert p.kind == "Gaussian PLY" and len(p.gaussians) == expected
    np.testing.assert_allclose(p.gaussians.centres, s.gaussians.centres, atol=1e-3)
    assert float(p.prepared.volume.max()) > 0  # their own render as the background


def test_opens_a_reconstruct_style_folder_not_in_hu(tmp_path, predicted):
    """``reconstruct`` writes attenuation (not HU) beside its PLY: shown between its percentiles, not refused."""
    import nibabel as nib

    s, _ = predicted
    folder = tmp_path / "recon"
    s.export("ply", folder)
    mu = (0.02 * s.prepared.volume.numpy()).astype(np.float32)  # attenuation-like values in 1/mm
    nib.save(nib.Nifti1Image(mu, s.prepared.ijk_to_ras), str(folder / "reconstruction.nii.gz"))
    r = ViewerSession().load(folder)
    assert r.kind == "output folder" and len(r.gaussians) == len(s.gaussians)
    assert r.prepared.shape == s.prepared.shape and float(r.prepared.volume.std()) > 0.1
    with pytest.raises(NotCTError):  # the same array is not a CT when opened as one
        ViewerSession().load(folder / "reconstruction.nii.gz")


def test_opens_a_real_ct_and_a_dicom_folder(small_real_ct, shared_ct):
    s = ViewerSession(spacing_mm=3.0).load(small_real_ct)
    assert s.kind == "CT" and s.hu.shape == (122, 101, 30) and s.gaussians is None
    assert np.allclose(np.diag(s.prepared.ijk_to_ras)[:3], [3.0, 3.0, 3.0], atol=0.05)  # RAS, 3 mm
    d = ViewerSession(spacing_mm=4.5).load(shared_ct / "totalsegmentator" / "example_ct_dicom")
    assert d.kind == "CT" and d.hu.shape == (512, 512, 20) and min(d.prepared.shape) >= 2
    assert _png_array(d.slice_png("axial"))[..., :3].std() > 0.05
