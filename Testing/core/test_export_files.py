"""export/ply.py and export/nifti.py: round trips and the 3DGS field layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medgmae_core import spatial
from medgmae_core.export import nifti, ply
from medgmae_core.gaussians import GaussianSet


def _gaussians(k=25, seed=0) -> GaussianSet:
    return GaussianSet.random(1, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _lps_oblique() -> np.ndarray:
    a = np.eye(4)
    c, s = np.cos(0.3), np.sin(0.3)
    a[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) @ np.diag([0.8, 0.8, 2.0])
    a[:3, 3] = [120.0, 90.0, -300.0]
    return a


def test_ply_is_3dgs_layout_binary_little_endian(tmp_path):
    gs = _gaussians()
    path = ply.write_gaussians_ply(tmp_path / "g.ply", gs)
    raw = path.read_bytes()
    header, _, body = raw.partition(b"end_header\n")
    text = header.decode()
    assert text.startswith("ply\nformat binary_little_endian 1.0\n")
    props = [line.split()[-1] for line in text.splitlines() if line.startswith("property")]
    assert props == list(ply.FIELDS)
    assert f"element vertex {gs.num_gaussians}" in text
    data = np.frombuffer(body, dtype=[(n, "<f4") for n in ply.FIELDS])
    assert len(data) == 25
    np.testing.assert_allclose(data["scale_1"], np.log(gs.scales[0, :, 1].numpy()), rtol=1e-6)
    np.testing.assert_allclose(data["rot_0"], gs.unit_quaternions()[0, :, 0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(1 / (1 + np.exp(-data["opacity"])), gs.intensities[0].numpy(), rtol=1e-4)
    np.testing.assert_allclose(0.5 + ply.SH_C0 * data["f_dc_2"], gs.intensities[0].numpy(), rtol=1e-5)


def test_ply_round_trip_normalised(tmp_path):
    gs = _gaussians()
    back = ply.read_gaussians_ply(ply.write_gaussians_ply(tmp_path / "g.ply", gs), dtype=torch.float64)
    assert back.coords == "normalised" and back.ijk_to_ras is None
    for name in ("centres", "scales", "intensities"):
        np.testing.assert_allclose(getattr(back.gaussians, name), getattr(gs, name), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(back.gaussians.covariances(), gs.covariances(), rtol=1e-5, atol=1e-9)


def test_ply_round_trip_in_ras_for_an_oblique_lps_grid(tmp_path):
    gs, shape, affine = _gaussians(), (200, 180, 60), _lps_oblique()
    path = ply.write_gaussians_ply(tmp_path / "g.ply", gs, shape=shape, ijk_to_ras=affine)
    data = np.frombuffer(path.read_bytes().partition(b"end_header\n")[2], dtype=[(n, "<f4") for n in ply.FIELDS])
    centres_ras, axes_ras = spatial.gaussians_to_world(gs, shape, affine)
    np.testing.assert_allclose(np.stack([data["x"], data["y"], data["z"]], -1), centres_ras, atol=1e-3)  # mm
    cov_ras = axes_ras @ axes_ras.transpose(0, 2, 1)
    world_axes = spatial.world_scales_quaternions_to_axes(
        np.exp(np.stack([data[f"scale_{a}"] for a in range(3)], -1)).astype(np.float64),
        np.stack([data[f"rot_{a}"] for a in range(4)], -1).astype(np.float64))
    np.testing.assert_allclose(world_axes @ world_axes.transpose(0, 2, 1), cov_ras, rtol=1e-4, atol=1e-3)
    back = ply.read_gaussians_ply(path, dtype=torch.float64)
    assert back.coords == "ras" and back.shape == shape
    np.testing.assert_allclose(back.ijk_to_ras, affine)
    np.testing.assert_allclose(back.gaussians.centres, gs.centres, atol=1e-6)
    np.testing.assert_allclose(back.gaussians.covariances(), gs.covariances(), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(back.gaussians.intensities, gs.intensities, rtol=1e-6)


def test_ply_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.ply"
    bad.write_bytes(b"not a ply")
    with pytest.raises(ValueError, match="bad.ply"):
        ply.read_gaussians_ply(bad)
    with pytest.raises(FileNotFoundError, match="missing.ply"):
        ply.read_gaussians_ply(tmp_path / "missing.ply")
    with pytest.raises(ValueError, match="batch size 2"):
        ply.write_gaussians_ply(tmp_path / "x.ply", GaussianSet.random(2, 3))
    path = ply.write_gaussians_ply(tmp_path / "t.ply", _gaussians())
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        ply.read_gaussians_ply(path)


def test_nifti_prediction_and_mask_round_trip(tmp_path):
    affine = _lps_oblique()
    pred = np.random.default_rng(0).normal(size=(9, 8, 7)).astype(np.float64)
    mask = (pred > 0).astype(np.float32)
    nifti.write_volume(tmp_path / "pred.nii.gz", pred, affine)
    nifti.write_volume(tmp_path / "mask.nii.gz", torch.from_numpy(mask), affine, kind="mask")
    arr, aff = nifti.read_volume_array(tmp_path / "pred.nii.gz")
    assert arr.dtype == np.float32
    np.testing.assert_allclose(arr, pred, rtol=1e-6)
    np.testing.assert_allclose(aff, affine, atol=1e-5)
    m, _ = nifti.read_volume_array(tmp_path / "mask.nii.gz")
    assert m.dtype == np.uint8 and np.array_equal(m, mask.astype(np.uint8))
    with pytest.raises(ValueError, match="3D"):
        nifti.write_volume(tmp_path / "x.nii.gz", pred[0], affine)
    with pytest.raises(ValueError, match=".nii"):
        nifti.write_volume(tmp_path / "x.nrrd", pred, affine)
