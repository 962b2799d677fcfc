"""examples/slicer_batch_predict.py under plain Python with slicer-core (as Slicer --python-script would run it)."""
from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

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
    assert "Gaussians predicted over one model window around the chosen point" in done.stdout
    scene = load_mrb(out)
    names = {scene.GetNthNode(i).GetName() for i in range(scene.GetNumberOfNodes())}
    assert {"example_ct_sm", "example_ct_sm masked", "example_ct_sm mask", "example_ct_sm MedGMAE prediction",
            "example_ct_sm Gaussians", "example_ct_sm Gaussian parameters"} <= names
    model = scene.GetFirstNodeByName("example_ct_sm Gaussians")
    table = scene.GetFirstNodeByName("example_ct_sm Gaussian parameters")
    n = table.GetNumberOfRows()
    assert n > 0 and model.GetPolyData().GetNumberOfPoints() == n * 50  # threshold 0: every Gaussian drawn
    import slicer
    ct = scene.GetFirstNodeByName("example_ct_sm")
    assert slicer.util.arrayFromVolume(ct).shape == (30, 101, 122)
    assert (tmp_path / "g.ply").stat().st_size > n * 60


def test_batch_predict_bad_input_exit_code(repo_root, tmp_path, capsys):
    done = _run(repo_root, "--input", tmp_path / "missing.nii.gz", "--out", tmp_path / "s.mrb")
    assert done.returncode == 2 and "input CT" in done.stderr and "does not exist" in done.stderr
    script = runpy.run_path(str(repo_root / "examples" / "slicer_batch_predict.py"))  # not as __main__
    assert script["main"](["--input", str(tmp_path)]) == 2  # --out missing: usage error
    assert "--out" in capsys.readouterr().err
    assert not any(p.suffix == ".mrb" for p in tmp_path.iterdir())


def test_offscreen_pictures_need_egl_chosen_first_or_a_display(monkeypatch):
    """VTK reads VTK_DEFAULT_OPENGL_WINDOW when it loads: the batch script sets it before importing anything, and
    render_3d says clearly what is missing instead of failing inside VTK."""
    from MedGMAESlicerLib.headless import OFFSCREEN_HINT, Session, offscreen_possible

    assert offscreen_possible({"VTK_DEFAULT_OPENGL_WINDOW": "vtkEGLRenderWindow"}, "linux")
    assert offscreen_possible({"DISPLAY": ":0"}, "linux") and offscreen_possible({}, "win32")
    assert not offscreen_possible({}, "linux")
    for name in ("VTK_DEFAULT_OPENGL_WINDOW", "DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="VTK_DEFAULT_OPENGL_WINDOW=vtkEGLRenderWindow before Python imports VTK"):
        Session(scene=None).render_3d()
    assert "xvfb-run" in OFFSCREEN_HINT
    text = (Path(__file__).resolve().parents[2] / "examples" / "slicer_batch_predict.py").read_text()
    assert text.index("VTK_DEFAULT_OPENGL_WINDOW") < text.index("import argparse")  # set before any import


def test_png_in_slicer_needs_the_main_window(monkeypatch):
    """Inside Slicer the picture is the layout's 3D view; with --no-main-window there is none: one clear error."""
    import types

    import slicer

    from MedGMAESlicerLib.headless import Session
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(layoutManager=lambda: None), raising=False)
    with pytest.raises(RuntimeError, match="needs Slicer's main window and a display"):
        Session(scene=None).render_3d()
