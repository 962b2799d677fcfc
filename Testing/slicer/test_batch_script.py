"""examples/slicer_batch_predict.py under plain Python with slicer-core (as Slicer --python-script would run it)."""
from __future__ import annotations

import os
import runpy
import subprocess
import sys

import pytest

from MedGMAESlicerLib.headless import load_mrb


def _run(repo_root, *args, timeout=300):
    return subprocess.run([sys.executable, str(repo_root / "examples" / "slicer_batch_predict.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=repo_root,
                          env={**os.environ, "MEDGMAE_RENDER_BACKEND": "torch"})


@pytest.mark.slow  # a fresh Python process importing torch, MONAI and slicer-core: ~10 s CPU, more when loaded
def test_batch_predict_writes_scene(repo_root, small_real_ct, tiny_checkpoint, tmp_path):
    out = tmp_path / "scene.mrb"
    done = _run(repo_root, "--", "--input", small_real_ct, "--checkpoint", tiny_checkpoint, "--out", out,
                "--mode", "point", "--mask-ratio", "0.5", "--ply", tmp_path / "g.ply", "--threshold", "0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "24 Gaussians over one model window" in done.stdout
    scene = load_mrb(out)
    names = {scene.GetNthNode(i).GetName() for i in range(scene.GetNumberOfNodes())}
    assert {"example_ct_sm", "example_ct_sm masked", "example_ct_sm mask", "example_ct_sm MedGMAE prediction",
            "example_ct_sm Gaussians", "example_ct_sm Gaussian parameters"} <= names
    model = scene.GetFirstNodeByName("example_ct_sm Gaussians")
    assert model.GetPolyData().GetNumberOfPoints() == 24 * 50
    import slicer
    ct = scene.GetFirstNodeByName("example_ct_sm")
    assert slicer.util.arrayFromVolume(ct).shape == (30, 101, 122)
    assert (tmp_path / "g.ply").stat().st_size > 24 * 60


def test_batch_predict_bad_input_exit_code(repo_root, tmp_path, capsys):
    done = _run(repo_root, "--input", tmp_path / "missing.nii.gz", "--out", tmp_path / "s.mrb")
    assert done.returncode == 2 and "input CT" in done.stderr and "does not exist" in done.stderr
    script = runpy.run_path(str(repo_root / "examples" / "slicer_batch_predict.py"))  # not as __main__
    assert script["main"](["--input", str(tmp_path)]) == 2  # --out missing: usage error
    assert "--out" in capsys.readouterr().err
    assert not any(p.suffix == ".mrb" for p in tmp_path.iterdir())
