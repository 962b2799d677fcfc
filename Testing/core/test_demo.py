"""``medgmae demo``: on the built-in phantom and on a shipped real CT it writes all outputs, consistently.

Uses a tiny randomly initialised checkpoint (48^3 windows) written with the checkpoint module, so the test does
not depend on the bundled demo weights.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("slicer")

from medgmae_core import cli, spatial  # noqa: E402
from medgmae_core.commands import demo  # noqa: E402
from medgmae_core.export import glyphs, nifti, ply, slicer_scene  # noqa: E402


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    from medgmae_core.model import build_model, get_config
    from medgmae_core.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_model(get_config("tiny", img_size=48))
    return save_checkpoint(tmp_path_factory.mktemp("weights") / "tiny48.pt", model=model)


def _check_outputs(res: dict, hu: np.ndarray, affine: np.ndarray, mask_ratio: float) -> None:
    out = res["outputs"]
    assert sorted(out) == ["mask", "ply", "png", "prediction", "scene"]
    pred, pred_aff = nifti.read_volume_array(out["prediction"])
    mask, mask_aff = nifti.read_volume_array(out["mask"])
    assert pred.shape == mask.shape == hu.shape  # the input CT's exact grid and affine (issue 13)
    np.testing.assert_allclose(pred_aff, mask_aff)
    np.testing.assert_allclose(pred_aff, affine, atol=1e-4)
    assert set(np.unique(mask)) <= {0, 1}
    assert abs(mask.mean() - mask_ratio) < 0.2  # random 12^3 patches, some windows padded
    # the prepared grid covers the same world box as the input CT
    corners = lambda shape, a: spatial.voxel_to_ras(np.array([[0, 0, 0], np.array(shape) - 1]), a)  # noqa: E731
    np.testing.assert_allclose(np.sort(corners(pred.shape, pred_aff), 0), np.sort(corners(hu.shape, affine), 0),
                               atol=3.1)
    # every Gaussian is in the PLY, in RAS, and centred inside the CT (issue 10: none from the padding)
    back = ply.read_gaussians_ply(out["ply"])
    assert back.coords == "ras" and back.gaussians.num_gaussians == res["gaussians"]
    assert 0 < res["gaussians"] <= res["windows"] * 512
    centres_ras, _ = spatial.gaussians_to_world(back.gaussians, back.shape, back.ijk_to_ras)
    lo, hi = np.sort(corners(hu.shape, affine), 0)
    margin = 3.5  # mm: half a prepared voxel plus the prepared grid's offset from the input's corners
    assert np.all((centres_ras > lo - margin) & (centres_ras < hi + margin))
    # the Slicer scene holds the CT, mask, prediction and glyph model
    scene = slicer_scene.read_scene(out["scene"]).scene
    ct_node = scene.GetFirstNodeByName("CT")
    np.testing.assert_allclose(slicer_scene.volume_array(ct_node), hu, atol=1e-3)
    np.testing.assert_allclose(slicer_scene.node_ijk_to_ras(ct_node), affine, atol=1e-5)
    np.testing.assert_array_equal(slicer_scene.volume_array(scene.GetFirstNodeByName("MedGMAE mask")), mask)
    np.testing.assert_allclose(slicer_scene.volume_array(scene.GetFirstNodeByName("MedGMAE prediction")), pred,
                               rtol=1e-5, atol=1e-3)
    model = scene.GetFirstNodeByName("MedGMAE Gaussians")
    assert model.GetPolyData().GetNumberOfPoints() == res["gaussians"] * glyphs.glyph_counts()[0]
    import matplotlib.image as mpimg

    img = mpimg.imread(out["png"])
    assert img.shape[1] > 1000 and img[..., :3].std() > 0.1


def test_demo_on_builtin_phantom_via_cli(tmp_path, tiny_weights, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no --out: the demo writes to ./medgmae_demo
    code = cli.main(["demo", "--weights", str(tiny_weights), "--seed", "3", "--phantom-shape", "40,40,32", "--json"])
    assert code == 0 and (tmp_path / demo.DEFAULT_OUT / "prediction.nii.gz").is_file()
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["source"].startswith("built-in phantom") and res["windows"] == 1
    from medgmae_core.data.phantom import make_phantom

    ph = make_phantom(shape=(40, 40, 32), seed=3)
    _check_outputs(res, ph.hu, ph.affine, 0.75)
    assert set(res["timings"]) >= {"load_model", "predict", "glyphs", "write_scene", "write_png"}


def test_demo_on_a_real_ct(tmp_path, tiny_weights, small_real_ct):
    res = demo.run_demo(small_real_ct, tmp_path / "out", weights=tiny_weights, mask_ratio=0.5, seed=1,
                        spacing_mm=4.5)
    import nibabel as nib

    img = nib.load(str(small_real_ct))
    assert res.source_shape == (122, 101, 30) and res.windows == 4  # 82x68x21 at 4.5 mm, 48^3 windows
    from dataclasses import asdict

    _check_outputs(asdict(res), np.asarray(img.dataobj, dtype=np.float32), img.affine, 0.5)


def test_missing_weights_give_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "BUNDLED_WEIGHTS", tmp_path / "nope" / "demo_tiny.pt")
    assert cli.main(["demo", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bundled demo weights are missing" in err and "--weights" in err
    assert cli.main(["demo", "--out", str(tmp_path / "o"), "--weights", str(tmp_path / "x.pt")]) == 2
    assert "x.pt" in capsys.readouterr().err
    assert cli.main(["demo", "--out", str(tmp_path / "o"), "--mask-ratio", "1.5",
                     "--weights", str(tmp_path / "x.pt")]) == 2


def test_demo_on_a_dicom_folder(tmp_path, tiny_weights, shared_ct):
    """A real DICOM series (LPS on disk): read through SimpleITK, RAS affine kept in every output."""
    folder = shared_ct / "totalsegmentator" / "example_ct_dicom"
    res = demo.run_demo(folder, tmp_path / "out", weights=tiny_weights, seed=2, spacing_mm=6.0)
    hu, affine = nifti.read_volume_array(folder, what="CT")
    assert res.source_shape == (512, 512, 20)
    from dataclasses import asdict

    _check_outputs(asdict(res), hu.astype(np.float32), affine, 0.75)


def test_main_job_with_the_bundled_demo_weights(tmp_path, monkeypatch):
    """The README's main job: `medgmae demo --out DIR` (relative path) with the bundled weights."""
    import nibabel as nib
    import numpy as np
    import torch

    from medgmae_core.data.phantom import make_phantom
    from medgmae_core.data.transforms import HU_WINDOW

    bundled = demo.BUNDLED_WEIGHTS
    assert bundled.stat().st_size <= 20 * 2**20
    ckpt = torch.load(bundled, map_location="cpu", weights_only=True)
    assert "not the paper's weights" in ckpt["extra"]["note"] and ckpt["optimizer"] is None
    # provenance: what it was trained on, and the held-out CT that it was not (issue 10)
    trained_on = [str(p) for p in ckpt["extra"]["training_data"]]
    assert any(p.startswith("phantom_") for p in trained_on) and ckpt["extra"]["held_out"]
    assert not set(ckpt["extra"]["held_out"]) & set(trained_on)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--out", "out"]) == 0
    out = tmp_path / "out"
    for name in ("prediction.nii.gz", "mask.nii.gz", "gaussians.ply", "scene.mrb", "overview.png"):
        assert (out / name).stat().st_size > 1000, name
    # Trained weights beat predicting the mean on the hidden voxels (an untrained model does not).
    lo, hi = HU_WINDOW
    ct = np.clip((make_phantom(seed=0).hu - lo) / (hi - lo), 0, 1)
    pred = np.clip((nib.load(str(out / "prediction.nii.gz")).get_fdata() - lo) / (hi - lo), 0, 1)
    hidden = nib.load(str(out / "mask.nii.gz")).get_fdata() > 0
    mse = float(((pred - ct)[hidden] ** 2).mean())
    mse_of_mean = float(((ct[hidden] - ct[hidden].mean()) ** 2).mean())
    assert mse < mse_of_mean, (mse, mse_of_mean)
