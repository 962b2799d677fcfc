"""The page's actions without a browser: ``ViewerApp`` over a session (state the page shows, errors in the page)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from medgmae_core.viewer.session import ViewerSession

_names = itertools.count()


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    from medgmae_core.model import build_model, get_config
    from medgmae_core.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_model(get_config("tiny", img_size=48))
    return save_checkpoint(tmp_path_factory.mktemp("weights") / "tiny48.pt", model=model)


def _app(**kw):
    from medgmae_core.viewer.app import ViewerApp

    return ViewerApp(ViewerSession(phantom_shape=(40, 40, 32)), name=f"medgmae-view-test-{next(_names)}", **kw)


def test_actions_update_what_the_page_shows(tiny_weights, tmp_path):
    app = _app(weights=str(tiny_weights), export_dir=tmp_path)
    s = app.state
    assert app.load(None) and s.error == "" and s.n_gaussians == 0
    assert all(s[f"{p}_src"].startswith("data:image/png;base64,") for p in ("axial", "coronal", "sagittal"))
    assert app.predict_now() and s.error == ""
    n = s.n_gaussians
    assert n == len(app.session.gaussians) > 0 and s.n_visible == n and "Gaussians in" in s.progress_text
    # thresholds from the page's sliders
    s.min_intensity = float(np.median(app.session.gaussians.intensities))
    app._apply_thresholds()
    assert 0 < s.n_visible < n
    # picking in the 3D view: the pixel of a visible glyph's centre
    app.scene.window.SetSize(400, 400)
    app.scene.reset_camera()
    app.scene.render()
    target = int(app.session.visible()[0])
    x, y = app.scene.display_position(app.session.gaussians.centres[target])
    app._on_click({"position": {"x": x, "y": y}})
    assert s.pick_index is not None and s.picked.startswith(f"Gaussian {s.pick_index}")
    app.show_index("2")
    assert s.picked.startswith("Gaussian 2\n")
    app.export("mrb")
    assert s.export_message.endswith("scene.mrb") and (tmp_path / "scene.mrb").is_file()


def test_errors_go_to_the_page_and_keep_the_input(tmp_path):
    app = _app(weights=str(tmp_path / "missing.pt"), export_dir=tmp_path / "exports")
    s = app.state
    assert app.load(None)
    assert not app.load(str(tmp_path / "nope.nii.gz"))
    assert "nope.nii.gz" in s.error and "not found" in s.error and app.session.kind == "phantom"
    assert not app.predict_now() and "checkpoint not found" in s.error and s.n_gaussians == 0
    app.export("ply")
    assert "Export failed" in s.error and "Predict" in s.error
    assert not (tmp_path / "exports").exists()  # nothing to export: no folder created either
