"""``medgmae render``: a PLY goes back to the volume it came from, on its own grid or another CT's."""
import numpy as np
import pytest
import torch

from medgmae_core.cli import main
from medgmae_core.export.nifti import read_volume_array, write_volume
from medgmae_core.export.ply import write_gaussians_ply
from medgmae_core.gaussians import GaussianSet
from medgmae_core.render import render_volume

SHAPE = (20, 18, 16)
AFFINE = np.array([[-1.5, 0, 0, 30.0], [0, -1.5, 0, 12.0], [0, 0, 2.0, -40.0], [0, 0, 0, 1]])


@pytest.fixture
def ply(tmp_path):
    gs = GaussianSet.random(1, 12, sigma_range=(0.05, 0.15), generator=torch.Generator().manual_seed(3),
                            dtype=torch.float64)
    path = write_gaussians_ply(tmp_path / "g.ply", gs, shape=SHAPE, ijk_to_ras=AFFINE)
    return path, gs


def test_render_ply_on_its_own_grid(ply, tmp_path, capsys):
    path, gs = ply
    out = tmp_path / "vol.nii.gz"
    assert main(["render", str(path), "--out", str(out), "--png", str(tmp_path / "v.png")]) == 0
    array, affine = read_volume_array(out)
    expected = render_volume(gs, SHAPE)[0].numpy()
    assert array.shape == SHAPE and np.allclose(affine, AFFINE)
    assert np.abs(array - expected).max() < 1e-4 * expected.max()
    assert (tmp_path / "v.png").stat().st_size > 10_000
    assert "12 Gaussians" in capsys.readouterr().out


def test_render_onto_a_finer_grid_with_like(ply, tmp_path):
    path, gs = ply
    # A grid with twice the resolution over the same field of view: voxel i*2 of the fine grid = voxel i here.
    fine_shape = tuple(2 * n - 1 for n in SHAPE)
    fine_affine = AFFINE.copy()
    fine_affine[:3, :3] /= 2
    like = write_volume(tmp_path / "like.nii.gz", np.zeros(fine_shape, np.float32), fine_affine)
    out = tmp_path / "fine.nii.gz"
    assert main(["render", str(path), "--out", str(out), "--like", str(like)]) == 0
    fine, _ = read_volume_array(out)
    coarse = render_volume(gs, SHAPE)[0].numpy()
    assert fine.shape == fine_shape
    assert np.abs(fine[::2, ::2, ::2] - coarse).max() < 1e-3 * coarse.max()


def test_render_errors_name_the_problem(tmp_path, capsys):
    gs = GaussianSet.random(1, 3)
    bare = write_gaussians_ply(tmp_path / "bare.ply", gs)  # normalised coordinates, no grid
    assert main(["render", str(bare), "--out", str(tmp_path / "x.nii.gz")]) == 2
    assert "--shape" in capsys.readouterr().err
    assert main(["render", str(bare), "--out", str(tmp_path / "x.nii.gz"), "--shape", "8,8"]) == 2
    assert "--shape must be D,H,W" in capsys.readouterr().err
    assert main(["render", str(tmp_path / "missing.ply"), "--out", str(tmp_path / "x.nii.gz")]) == 2
    assert "missing.ply" in capsys.readouterr().err
    assert main(["render", str(bare), "--out", str(tmp_path / "x.nii.gz"), "--shape", "8"]) == 0
