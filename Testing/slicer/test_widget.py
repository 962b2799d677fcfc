"""MedGMAESlicer.py and its panel, opened the way Slicer opens them.

The application parts slicer-core lacks come from ``slicer_app_standin.py`` (PythonQt widgets built from the .ui
file, ``ScriptedLoadableModule``, the parameter node wrapper, ``slicer.app``), each mirroring Slicer's source; the
MRML scene and ``slicer.util`` (``loadUI``, ``childWidgetVariables``, ``tryWithErrorDisplay``,
``confirmOkCancelDisplay``, ``setSliceViewerLayers``...) are slicer-core's real ones.
"""
from __future__ import annotations

import ast
import importlib.metadata
import logging
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import slicer_app_standin as standin

REPO = Path(__file__).resolve().parents[2]
MODULE_FILE = REPO / "MedGMAESlicer" / "MedGMAESlicer.py"


@pytest.fixture()
def app(monkeypatch, session):
    from MedGMAESlicerLib import parameters

    monkeypatch.setattr(parameters, "_connector_registered", False)
    parameters.parameter_node_wrapper_class.cache_clear()
    application = standin.install(monkeypatch, module_path=MODULE_FILE)
    yield application
    standin.close_opened_widgets()
    sys.modules.pop("MedGMAESlicer", None)
    parameters.parameter_node_wrapper_class.cache_clear()


def _pump(timer, until, seconds=300.0):
    """Let the event loop run the poll timer until ``until()``."""
    end = time.monotonic() + seconds
    while not until() and time.monotonic() < end:
        timer.fire()
        time.sleep(0.05)
    assert until(), "timed out"


def _blob(session, name="ct"):
    from MedGMAESlicerLib.logic import add_volume
    from MedGMAESlicerLib.selftest import blob_volume, oblique_lps_affine
    return add_volume(session.scene, blob_volume(), oblique_lps_affine(), name)


def test_module_metadata_and_setup(app, session):
    volume = _blob(session)
    node = session.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")  # a scene saved by an older version
    node.SetSingletonTag("MedGMAESlicer")
    node.SetAttribute("ModuleName", "MedGMAESlicer")
    node.SetParameter("exportDirectory", ".")
    s = standin.open_module(MODULE_FILE)
    parent = standin.module_parent(MODULE_FILE)
    s.module.MedGMAESlicer(parent)
    assert parent.title == "MedGMAE" and parent.categories == ["Utilities"]  # it does not segment
    assert all(re.fullmatch(r"[^()]+ \([^()]+\)", c) for c in parent.contributors)  # "Name (Organisation)"
    assert '<a href="https://github.com/medgmae/MedGMAE-Slicer/blob/main/MedGMAESlicer/README.md">' in parent.helpText
    assert Path(parent.icon.path) == REPO / "MedGMAESlicer" / "Resources" / "Icons" / "MedGMAESlicer.png"

    ui, panel = s.widget.ui, s.widget.panel
    assert s.widget._parameterNode.inputVolume is volume  # the first volume is picked
    assert not ui.dependencyStatusLabel.visible and ui.installStatusLabel.text.startswith("All Python packages")
    assert ui.checkpointPathLineEdit.currentPath == "" and ui.exportDirectoryPathLineEdit.currentPath == ""
    assert ui.windowModeComboBox.currentText == "One window around the point"
    assert ui.reconSourceComboBox.items == ["Simulate a scan of the input CT", "Measured projections from a file"]
    assert ui.previewMaskButton.enabled and ui.predictButton.enabled and not ui.exportPlyButton.enabled
    assert panel.jobTimer.active and panel.jobTimer.interval == 250
    s.widget.cleanup()
    assert not panel.jobTimer.active and not panel.glyphTimer.active


def test_widget_mask_predict_display_export_train(app, session, tiny_checkpoint, tmp_path, caplog):
    volume = _blob(session)
    s = standin.open_module(MODULE_FILE)
    ui, panel, params = s.widget.ui, s.widget.panel, s.widget._parameterNode
    logic = s.widget.logic
    # the module's logic: Slicer's ScriptedLoadableModuleLogic with the facade's parts, on the app's scene
    from MedGMAESlicerLib.display import DisplayLogic
    assert logic.moduleName == "MedGMAESlicer" and isinstance(logic.display, DisplayLogic)
    assert logic.scene is session.scene and logic.background.ct_writer == logic.display.write_input_ct

    ui.previewMaskButton.clicked.emit()
    assert ui.maskStatusLabel.text.startswith("Masked") and "label layer" in ui.maskStatusLabel.text
    assert app.layoutManager().slice_logics[0].fits == 1  # new layers are fitted to the views

    # settings through the widgets, as a user sets them
    ui.checkpointPathLineEdit.currentPath = str(tiny_checkpoint)
    ui.maskRatioSlider.value = 0.5
    assert params.checkpointPath == str(tiny_checkpoint) and params.maskRatio == 0.5

    # Predict runs in a background process: the button becomes Cancel, conflicting actions wait
    ui.predictButton.clicked.emit()
    assert panel.predictPanel.running and ui.predictButton.text == "Cancel" and ui.predictButton.enabled
    assert not ui.previewMaskButton.enabled and not ui.installDependenciesButton.enabled
    assert not ui.checkDependenciesButton.enabled and ui.predictProgressBar.visible
    assert logic.last_prediction is None  # nothing computed in this process
    _pump(panel.jobTimer, lambda: not panel.predictPanel.running)
    prediction = logic.last_prediction
    assert prediction is not None, ui.predictStatusLabel.text
    n = len(prediction.intensities)
    assert ui.predictStatusLabel.text.startswith(f"{n} Gaussians predicted over one model window")
    assert ui.predictButton.text == "Predict" and ui.predictButton.enabled and ui.previewMaskButton.enabled
    assert ui.exportPlyButton.enabled and ui.predictProgressBar.value == 100
    assert app.layoutManager().slice_logics[0].fits == 2
    assert prediction.prediction_node.GetScene() is session.scene and prediction.volume_node is volume

    # display: opacity at once; glyph geometry once the slider is still (not per tick)
    rebuilds = []
    real_update = logic.display.update_glyphs
    logic.display.update_glyphs = lambda p, force=False: (rebuilds.append(p.glyph.geometry())
                                                          if force or p.glyph.geometry() != p.glyph_key else None,
                                                          real_update(p, force))
    ui.glyphOpacitySlider.value = 0.3
    assert prediction.model_node.GetDisplayNode().GetOpacity() == pytest.approx(0.3) and rebuilds == []
    for value in (0.2, 0.3, 0.4):  # dragging the threshold slider
        ui.intensityThresholdSlider.value = value
    assert rebuilds == [] and panel.glyphTimer.active and prediction.glyph.threshold == pytest.approx(0.1)
    panel.glyphTimer.fire()
    assert rebuilds == [(8, 0.4, 2)] and prediction.glyph.threshold == pytest.approx(0.4)
    assert "at least 40% as bright" in ui.predictStatusLabel.text

    # the overlay opacity changes only in the views that show the prediction
    composites = [session.scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode") for i in range(3)]
    composites[1].SetForegroundVolumeID(volume.GetID())
    composites[1].SetForegroundOpacity(0.25)
    ui.predictionOpacitySlider.value = 0.7
    assert [c.GetForegroundOpacity() for c in composites] == pytest.approx([0.7, 0.25, 0.7])

    # an error: shown by slicer.util.tryWithErrorDisplay (logged here: no main window), re-raised, then reported
    caplog.set_level(logging.ERROR)
    ui.exportNiftiButton.clicked.emit()
    assert ui.predictStatusLabel.text == "Export failed. export folder: choose a folder to write to"
    assert any("Export failed." in r.getMessage() and "choose a folder" in r.getMessage() for r in caplog.records)
    assert standin.QApplication.overrideCursor() is None  # the wait cursor was restored
    ui.exportDirectoryPathLineEdit.currentPath = str(tmp_path)
    ui.exportPlyButton.clicked.emit()
    assert (tmp_path / "ct_gaussians.ply").is_file() and ui.predictStatusLabel.text.startswith("Wrote ")

    # Train with a folder that does not exist: said, and the button stays
    ui.trainDataPathLineEdit.currentPath = str(tmp_path / "missing")
    ui.trainOutputPathLineEdit.currentPath = str(tmp_path / "run")
    ui.trainButton.clicked.emit()
    assert ui.trainButton.text == "Start training" and "does not exist" in ui.trainStatusLabel.text
    s.widget.cleanup()
    assert not panel.jobTimer.active


def test_cancel_returns_at_once_and_closing_the_scene_cancels(app, session, tiny_checkpoint):
    _blob(session)
    s = standin.open_module(MODULE_FILE)
    ui, panel, logic = s.widget.ui, s.widget.panel, s.widget.logic
    ui.checkpointPathLineEdit.currentPath = str(tiny_checkpoint)
    ui.windowModeComboBox.currentIndex = 1  # Whole volume
    ui.predictButton.clicked.emit()
    t0 = time.monotonic()
    ui.predictButton.clicked.emit()  # Cancel
    assert time.monotonic() - t0 < 0.5
    assert ui.predictButton.text == "Cancelling..." and not ui.predictButton.enabled
    _pump(panel.jobTimer, lambda: not panel.predictPanel.running, seconds=60)
    assert ui.predictStatusLabel.text == "Cancelled." and ui.predictButton.text == "Predict"
    assert ui.predictButton.enabled and logic.last_prediction is None
    assert session.scene.GetFirstNodeByName("ct MedGMAE prediction") is None
    assert not panel.predictPanel.job.context.output_path.parent.exists()  # its temporary files are gone

    ui.predictButton.clicked.emit()
    job = panel.predictPanel.job
    session.scene.Clear(0)  # File > Close scene while predicting
    assert job.is_cancelling or job.result is not None
    _pump(panel.jobTimer, lambda: not panel.predictPanel.running, seconds=60)
    assert job.result.state.value == "cancelled" and logic.last_prediction is None
    assert s.widget._parameterNode is not None  # a new parameter node for the new scene
    s.widget.cleanup()


def test_missing_dependencies_are_reported_and_installed_only_after_asking(app, session, monkeypatch):
    """In this process torch and MONAI are installed; their metadata is hidden, as if they were not."""
    real_version = importlib.metadata.version

    def version(name):
        if name.lower() in ("torch", "monai"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)
    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "standin_extensions"))  # the PyTorch extension
    import PyTorchUtils
    monkeypatch.setattr(PyTorchUtils, "calls", [])
    _blob(session)
    s = standin.open_module(MODULE_FILE)
    ui = s.widget.ui
    message = "MedGMAE needs Python packages that are not installed yet: torch, monai."
    assert ui.dependencyStatusLabel.visible and ui.dependencyStatusLabel.text.startswith(message)
    assert not ui.installCollapsibleButton.collapsed

    app.answers.append(standin.QMessageBox.Ok)  # "Install now?" -> OK
    ui.installDependenciesButton.clicked.emit()
    assert len(app.dialogs) == 1 and app.dialogs[0]["title"] == "MedGMAE - install Python packages"
    assert PyTorchUtils.calls == [{"askConfirmation": False, "torchVersionRequirement": "<=2.13.0,>=2.2"}]
    # the stand-in extension reports a failed install: said, nothing else attempted
    assert ui.installStatusLabel.text.startswith("PyTorch was not installed")

    app.testing = True  # CTest: nothing is asked or installed
    ui.predictButton.clicked.emit()
    assert len(app.dialogs) == 1 and not s.widget.panel.predictPanel.running
    assert ui.predictStatusLabel.text.startswith(message)
    s.widget.cleanup()


def test_older_slicer_gets_one_message(monkeypatch, session):
    standin.install(monkeypatch, module_path=MODULE_FILE, version=(5, 8))
    try:
        s = standin.open_module(MODULE_FILE)
        message = s.module.UNSUPPORTED
        assert message.startswith("MedGMAE needs 3D Slicer 5.10 or newer (Python 3.12); this is 3D Slicer 5.8")
        labels = [w for w in s.widget.parent.children() if isinstance(w, standin.QLabel)]
        assert [label.text for label in labels] == [message] and not hasattr(s.widget, "ui")
        s.widget.cleanup()
        test = s.module.MedGMAESlicerTest()
        test.runTest()
        assert test.messages == [message]
    finally:
        standin.close_opened_widgets()
        sys.modules.pop("MedGMAESlicer", None)
    # what an old Slicer (Python 3.9) reads before it can say so is valid Python 3.9 ...
    lib = REPO / "MedGMAESlicer" / "MedGMAESlicerLib"
    for path in (MODULE_FILE, lib / "__init__.py", lib / "compat.py"):
        ast.parse(path.read_text(), feature_version=(3, 9))
    # ... and, where a Python 3.9 is at hand, runs there
    candidates = [shutil.which("python3.9"), *map(str, sorted(Path.home().glob(".pyenv/versions/3.9*/bin/python")))]
    python39 = next((p for p in candidates
                     if p and Path(p).is_file() and subprocess.run([p, "-c", "1"], capture_output=True).returncode == 0),
                    None)
    if python39:
        code = ("import sys; sys.path.insert(0, sys.argv[1]); import py_compile; py_compile.compile(sys.argv[2], "
                "doraise=True); from MedGMAESlicerLib.compat import unsupported_reason; print(unsupported_reason())")
        done = subprocess.run([python39, "-c", code, str(MODULE_FILE.parent), str(MODULE_FILE)], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0 and "this is Python 3.9" in done.stdout, done.stderr
    from MedGMAESlicerLib.compat import unsupported_reason
    assert unsupported_reason(python=(3, 9), slicer=None).startswith("MedGMAE needs 3D Slicer 5.10 or newer")
    assert unsupported_reason(python=(3, 12), slicer=(5, 10)) is None


def test_developer_reload_reloads_the_library(app, session):
    """Reload re-imports every MedGMAESlicerLib submodule, then the module file (keep this test last: it replaces
    the library's classes in this process)."""
    import MedGMAESlicerLib
    from MedGMAESlicerLib import SUBMODULES

    s = standin.open_module(MODULE_FILE)
    before = {name: dict(vars(sys.modules[f"MedGMAESlicerLib.{name}"])) for name in SUBMODULES}
    s.widget.onReload()
    assert s.widget.reloads == 1 and not s.widget.panel.jobTimer.active  # the old panel was cleaned up
    new_widget = standin.opened_widgets[-1]
    assert new_widget is not s.widget and new_widget.panel.jobTimer.active  # and a new one set up
    for name in SUBMODULES:
        module = sys.modules[f"MedGMAESlicerLib.{name}"]
        functions = [k for k, v in before[name].items() if callable(v) and getattr(v, "__module__", "") == module.__name__]
        assert functions and all(getattr(module, k) is not before[name][k] for k in functions), name
    assert sys.modules["MedGMAESlicer"].MedGMAEPanel is MedGMAESlicerLib.panel.MedGMAEPanel
