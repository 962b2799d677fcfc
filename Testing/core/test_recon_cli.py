"""``medgmae reconstruct`` end to end on real data: a sparse-view simulated scan of a real CT (Gaussians beat
FBP), resume, the measured tooth scan, and clear errors for bad inputs.

Stated numbers (example_ct_sm, full in-plane field, slices 8:24, downsampled x4 -> 30x25x4 at 12 mm, parallel
beam, 5 views): FBP ~15.5 dB PSNR; 20 iterations from the FBP heuristic (1000 Gaussians) ~17 dB.
"""
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from medgmae_core.cli import main as cli_main
from medgmae_core.export.ply import read_gaussians_ply
from medgmae_core.recon.data_exchange import load_data_exchange
from medgmae_core.recon.initialisation import analytic_reconstruction
from medgmae_core.recon.projection_file import save_projections
from medgmae_core.recon.simulation import load_ct_volume, simulate_from_ct
from medgmae_core.train.checkpoint import bundled_weights

CROP = "0:120,0:100,8:24"


def _events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def sparse_run(small_real_ct, tmp_path_factory):
    out = tmp_path_factory.mktemp("recon") / "run"
    argv = ["reconstruct", str(small_real_ct), "--crop", CROP, "--downsample", "4", "--geometry", "parallel",
            "--views", "5", "--init", "fbp", "--num-gaussians", "1000", "--iters", "20", "--eval-every", "10",
            "--checkpoint-every", "10", "--out", str(out), "--progress-json"]
    return out, argv


def test_sparse_view_gaussians_beat_fbp_and_write_outputs(sparse_run, small_real_ct, capsys):
    out, argv = sparse_run
    assert cli_main(argv) == 0
    events = _events(capsys.readouterr().out)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and "checkpoint" in kinds
    assert [e["step"] for e in events if e["event"] == "progress"] == [0, 10, 20]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fbp_psnr"] < 17.0  # 5 views: streaks
    assert metrics["psnr"] > metrics["fbp_psnr"] + 1.0, (metrics["psnr"], metrics["fbp_psnr"])
    assert metrics["psnr"] > metrics["init_psnr"]
    assert 0 < metrics["ssim"] <= 1 and metrics["data_range"] > 0
    for key in ("iterations_to_psnr30", "seconds_to_psnr30", "iterations_to_psnr35", "seconds_to_psnr35"):
        assert key in metrics
    # progress against the analytic baseline, read off the PSNR history
    assert metrics["psnr_over_fbp"] == pytest.approx(metrics["psnr"] - metrics["fbp_psnr"])
    for name, margin in (("fdk", 0), ("fdk_plus2", 2), ("fdk_plus4", 4)):
        assert metrics[f"target_{name}_psnr"] == pytest.approx(metrics["fbp_psnr"] + margin)
        hit = next((h for h in metrics["history"] if h["psnr"] >= metrics["fbp_psnr"] + margin), None)
        assert metrics[f"iterations_to_{name}"] == (hit["iteration"] if hit else None)
        assert metrics[f"seconds_to_{name}"] == (hit["seconds"] if hit else None)
    assert metrics["iterations_to_fdk"] is not None and metrics["iterations_to_fdk"] <= 20
    # the side-by-side picture users look at first: FDK/FBP, Gaussians, ground truth
    from PIL import Image

    png = Image.open(out / "comparison.png")
    assert png.size[0] > 1.25 * png.size[1] and (out / "comparison.png").stat().st_size > 10_000
    # NIfTI on the input's grid (the cropped, downsampled CT's affine)
    _, affine = load_ct_volume(small_real_ct, crop=CROP, downsample=4)
    img = nib.load(str(out / "reconstruction.nii.gz"))
    assert img.shape == (30, 25, 4) and np.allclose(img.affine, affine, atol=1e-4)
    hu = nib.load(str(out / "reconstruction_hu.nii.gz")).get_fdata()
    assert -1100 < float(np.median(hu)) < 200  # an abdomen in HU
    ply = read_gaussians_ply(out / "gaussians.ply")
    assert ply.gaussians.num_gaussians == metrics["num_gaussians"] and ply.coords == "ras"
    assert (out / "reconstruction.png").stat().st_size > 10_000


def test_resume_continues_from_the_checkpoint(sparse_run, tmp_path, capsys):
    out, argv = sparse_run
    if not (out / "recon_checkpoint.pt").exists():
        pytest.skip("needs the sparse run")
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    argv = [a if a != str(out) else str(resumed) for a in argv]
    argv[argv.index("--iters") + 1] = "30"
    assert cli_main(argv + ["--resume"]) == 0
    events = _events(capsys.readouterr().out)
    start = events[0]
    assert start["event"] == "start" and start["resumed_from"] == 20
    assert [e["step"] for e in events if e["event"] == "progress"] == [30]
    metrics = json.loads((resumed / "metrics.json").read_text())
    assert metrics["iterations"] == 30 and [h["iteration"] for h in metrics["history"]] == [0, 10, 20, 30]
    missing = tmp_path / "missing.pt"
    assert cli_main(argv + ["--resume", str(missing)]) == 2  # an explicit PATH must exist
    err = capsys.readouterr().err
    assert "no checkpoint" in err and str(missing) in err
    fresh = [a if a != str(resumed) else str(tmp_path / "fresh") for a in argv]
    assert cli_main(fresh + ["--resume"]) == 0  # a bare --resume is auto: nothing to continue, so it starts
    assert _events(capsys.readouterr().out)[0]["resumed_from"] is None


def test_tooth_fbp_is_a_recognisable_cross_section(shared_ct):
    tooth = shared_ct / "tomography" / "tomopy_tooth.h5"
    data = load_data_exchange(tooth, bin_cols=4)
    fbp = analytic_reconstruction(data)[:, :, 0]  # [105, 105]
    top = float(torch.quantile(fbp.flatten(), 0.99))
    mask = fbp > 0.35 * top
    frac = float(mask.float().mean())
    assert 0.1 < frac < 0.5  # the tooth fills part of the field, not all of it
    background = fbp[~mask]
    assert float(fbp[mask].mean()) > 10 * float(background.std())  # high contrast against the background
    ij = torch.nonzero(mask).float()
    com = ij.mean(0) / (torch.tensor(fbp.shape) - 1)
    assert float((com - 0.5).abs().max()) < 0.15  # centred on the rotation axis
    # the off-centre axis matters: assuming the detector centre blurs the tooth (lower peak contrast)
    wrong = load_data_exchange(tooth, bin_cols=4, centre=319.5)
    blurred = analytic_reconstruction(wrong)[:, :, 0]
    assert float(torch.quantile(blurred.flatten(), 0.99)) < 0.9 * top or float(blurred.min()) < 2 * float(fbp.min())


def test_tooth_gaussian_reconstruction(shared_ct, tmp_path, capsys):
    out = tmp_path / "tooth"
    argv = ["reconstruct", str(shared_ct / "tomography" / "tomopy_tooth.h5"), "--bin-cols", "8", "--init", "fbp",
            "--num-gaussians", "800", "--iters", "15", "--views-per-iter", "20", "--eval-every", "15",
            "--out", str(out), "--progress-json"]
    assert cli_main(argv) == 0
    events = _events(capsys.readouterr().out)
    losses = [e["loss"] for e in events if e["event"] == "progress" and e["step"] > 0]
    recon = nib.load(str(out / "reconstruction.nii.gz")).get_fdata()[:, :, 0]
    fbp = nib.load(str(out / "fbp.nii.gz")).get_fdata()[:, :, 0]
    corr = np.corrcoef(recon.ravel(), fbp.ravel())[0, 1]
    assert corr > 0.9, corr  # the same cross-section as the FBP
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["meta"]["rotation_centre"] == "auto" and "psnr" not in metrics  # no reference for real data
    assert losses and losses[-1] < 0.05


def test_bad_inputs_are_rejected_clearly(tmp_path, small_real_ct, capsys):
    def err(*argv):
        assert cli_main(["reconstruct", *argv, "--out", str(tmp_path / "o")]) == 2
        return capsys.readouterr().err

    assert "not found" in err(str(tmp_path / "missing.nii.gz"))
    (tmp_path / "x.txt").write_text("hi")
    assert "unknown input type" in err(str(tmp_path / "x.txt"))
    assert "--sod" in err(str(small_real_ct), "--sod", "500")
    assert "source_to_origin" in err(str(small_real_ct), "--crop", CROP, "--downsample", "4", "--geometry", "cone",
                                     "--sod", "0")
    assert "--crop" in err(str(small_real_ct), "--crop", "0:500,:,:")
    assert "views" in err(str(small_real_ct), "--views", "0")
    # projections whose angles do not match the projections
    data = simulate_from_ct(small_real_ct, crop=CROP, downsample=4, views=6)
    path = save_projections(tmp_path / "scan.npz", data)
    z = dict(np.load(path))
    z["angles"] = z["angles"][:4]
    np.savez(tmp_path / "bad.npz", **z)
    assert "4 angles but 6 projections" in err(str(tmp_path / "bad.npz"))
    # a detector too small for the volume
    z = dict(np.load(path))
    z["projections"] = z["projections"][:, :, :9]
    np.savez(tmp_path / "small.npz", **z)
    assert "too small" in err(str(tmp_path / "small.npz"))
    assert "--checkpoint not found" in err(str(path), "--init", "medgmae", "--checkpoint", str(tmp_path / "no.pt"))


@pytest.mark.skipif(bundled_weights() is None, reason="no bundled weights (medgmae_core/weights/*.pt)")
def test_medgmae_init_with_the_bundled_weights(small_real_ct, tmp_path, capsys):
    out = tmp_path / "mg"
    argv = ["reconstruct", str(small_real_ct), "--crop", "10:106,0:96,8:24", "--downsample", "2", "--views", "12",
            "--init", "medgmae", "--spacing-mm", "0", "--num-gaussians", "1500", "--iters", "10",
            "--eval-every", "5", "--out", str(out),
            "--progress-json"]
    assert cli_main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # sets whose least-squares gain is 0 are dropped (the demo weights' blurry prediction may be)
    kept = (metrics["predicted_gaussians"] * (metrics["gain_converted"] > 0)
            + metrics["residual_gaussians"] * (metrics["gain_residual"] > 0))
    assert metrics["initial_gaussians"] == kept
    assert metrics["predicted_gaussians"] > 0 and metrics["checkpoint"] == str(bundled_weights())
    assert metrics["gain_converted"] >= 0 and metrics["gain_residual"] >= 0
    assert metrics["gain_converted"] + metrics["gain_residual"] > 0
    assert metrics["init_psnr"] > metrics["fbp_psnr"] - 3.0  # the residual set carries the FDK's clipped content
    losses = [h["loss"] for h in metrics["history"] if isinstance(h["loss"], float)]
    assert len(losses) >= 1 and metrics["history"][-1]["loss"] <= losses[0]


def test_reconstruct_speaks_the_flag_vocabulary():
    """--spacing-mm (old spelling --model-spacing, hidden) and --resume [auto|PATH] as in commands.options."""
    import argparse

    from medgmae_core.commands import reconstruct as reconstruct_command

    parser = argparse.ArgumentParser()
    reconstruct_command.add_arguments(parser)
    base = ["ct.nii.gz", "--out", "o"]
    assert parser.parse_args(base + ["--model-spacing", "0"]).spacing_mm == 0.0
    assert parser.parse_args(base + ["--spacing-mm", "2"]).spacing_mm == 2.0
    assert parser.parse_args(base).spacing_mm == 1.5 and parser.parse_args(base).resume is None
    assert parser.parse_args(base + ["--resume"]).resume == "auto"
    assert parser.parse_args(base + ["--resume", "x.pt"]).resume == "x.pt"
    shown = parser.format_help()
    assert "--spacing-mm" in shown and "--model-spacing" not in shown


def test_medgmae_star_defaults_to_the_bundled_star_weights(tmp_path, monkeypatch):
    from argparse import Namespace

    from medgmae_core.commands import reconstruct as command
    from medgmae_core.train import checkpoint as ckpt

    star = tmp_path / "medgmae_star_tiny.pt"
    monkeypatch.setattr(ckpt, "BUNDLED_STAR_WEIGHTS", star)
    with pytest.raises(ValueError, match=r"--init medgmae\* needs --checkpoint"):
        command.resolve_checkpoint(Namespace(init="medgmae*", checkpoint=None))
    star.write_bytes(b"")
    assert command.resolve_checkpoint(Namespace(init="medgmae*", checkpoint=None)) == star
    assert command.resolve_checkpoint(Namespace(init="medgmae", checkpoint=None)) == ckpt.bundled_weights()
    assert command.resolve_checkpoint(Namespace(init="fbp", checkpoint=None)) is None
