"""volume_fit / `medgmae fit`: the direct fit of Gaussians to a volume (the pre-training benchmark's bound)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medgmae_core import cli
from medgmae_core.render import render_volume
from medgmae_core.volume_fit import fit_volume, grid_gaussians

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def blob_volume(n: int = 24) -> torch.Tensor:
    z, y, x = torch.meshgrid(*[torch.linspace(-1, 1, n)] * 3, indexing="ij")
    return (0.8 * torch.exp(-((x - 0.3) ** 2 + y ** 2 + (z + 0.2) ** 2) / 0.1) + 0.3 * (x.abs() < 0.5)).float()


def test_grid_start_follows_the_volume_and_the_fit_improves_it():
    vol = blob_volume()
    start = grid_gaussians(vol, 64)
    assert start.num_gaussians == 64 and torch.all(start.intensities >= 0)
    mean_start = float(render_volume(start, vol.shape).mean())
    assert abs(mean_start - float(vol.mean())) < 0.5 * float(vol.mean())  # the amplitudes carry the volume's level
    fit = fit_volume(vol, 64, iters=60)
    history = [e["psnr"] for e in fit.result.history]
    assert fit.gaussians.num_gaussians == 64  # no densify: the fixed-k bound
    assert history[-1] > history[0] + 1.0 and fit.metrics["psnr"] == pytest.approx(history[-1])
    grown = fit_volume(vol, 64, iters=150, densify=True, max_gaussians=128)
    assert 64 < grown.gaussians.num_gaussians <= 128


def test_fit_command_writes_ply_nifti_png_and_metrics(tmp_path):
    import nibabel as nib

    ct = tmp_path / "ct.nii.gz"
    hu = (blob_volume(20).numpy() * 400 - 175).astype(np.float32)
    nib.save(nib.Nifti1Image(hu, np.diag([1.5, 1.5, 1.5, 1.0])), str(ct))
    out = tmp_path / "out"
    assert cli.main(["fit", str(ct), "--out", str(out), "--num-gaussians", "27", "--iters", "20"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_gaussians"] == 27 and metrics["shape"] == [20, 20, 20] and metrics["psnr"] > 10
    img = nib.load(str(out / "fit.nii.gz"))
    assert img.shape == (20, 20, 20) and np.allclose(img.affine, np.diag([1.5, 1.5, 1.5, 1.0]))
    assert (out / "gaussians.ply").stat().st_size > 1000 and (out / "overview.png").stat().st_size > 1000
    assert cli.main(["fit", str(ct), "--out", str(tmp_path / "bad"), "--num-gaussians", "0"]) == 2
