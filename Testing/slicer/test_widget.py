"""MedGMAESlicer.py's widget wired to stand-ins for PythonQt, Slicer's module base classes and parameterNodeWrapper.

The real app cannot run here, so this drives the module file's own code (setup, buttons, parameter observers,
Apply/Cancel) on a real slicer-core scene with fake widgets built from the .ui file's object names.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


class Signal:
    def __init__(self):
        self.slots = []

    def connect(self, slot):
        self.slots.append(slot)

    def emit(self, *args):
        for slot in list(self.slots):
            slot(*args)


class FakeWidget:
    def __init__(self, name, cls, text=""):
        self.objectName, self.className, self.text = name, cls, text
        self.enabled, self.visible, self.value = True, True, 0
        for signal in ("clicked", "currentNodeChanged", "valueChanged", "timeout"):
            setattr(self, signal, Signal())

    def setText(self, text):
        self.text = text

    def setMRMLScene(self, scene):
        self.scene = scene

    def setCurrentNode(self, node):
        self.currentNode = node

    # QTimer
    def setInterval(self, ms):
        self.interval = ms

    def start(self):
        self.active = True

    def stop(self):
        self.active = False


def fake_ui(path):
    root = ET.parse(path).getroot()
    ui = types.SimpleNamespace()
    for w in root.iter("widget"):
        text = next((p.findtext("string") for p in w.findall("property") if p.get("name") == "text"), "") or ""
        setattr(ui, w.get("name"), FakeWidget(w.get("name"), w.get("class"), text))
    return ui


class FakeWrapperBase:
    """Just enough of slicer.parameterNodeWrapper: typed attributes stored in the scripted module node."""

    def __init__(self, node):
        from MedGMAESlicerLib.parameters import MedGMAEParameters
        object.__setattr__(self, "parameterNode", node)
        if not node.GetParameter("maskRatio"):
            MedGMAEParameters().write_to_node(node)

    def __getattr__(self, name):
        from MedGMAESlicerLib.parameters import MedGMAEParameters
        return getattr(MedGMAEParameters.read_from_node(self.parameterNode), name)

    def __setattr__(self, name, value):
        from MedGMAESlicerLib.parameters import MedGMAEParameters
        params = MedGMAEParameters.read_from_node(self.parameterNode)
        setattr(params, name, value)
        params.validate().write_to_node(self.parameterNode)  # fires ModifiedEvent like the real wrapper

    def connectGui(self, ui):
        return 1

    def disconnectGui(self, tag):
        pass

    def AddObserver(self, event, callback, priority=0.0):
        return self.parameterNode.AddObserver(event, callback, priority)

    def RemoveObserver(self, tag):
        self.parameterNode.RemoveObserver(tag)


@pytest.fixture()
def widget_module(monkeypatch, session):
    import slicer
    import typing

    from MedGMAESlicerLib import parameters

    def parameterNodeWrapper(cls):
        hints = typing.get_type_hints(cls, include_extras=True)
        assert list(hints) == list(parameters.field_specs())
        return type(cls.__name__, (FakeWrapperBase,), {})

    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = parameterNodeWrapper
    pnw.WithinRange = lambda lo, hi: ("range", lo, hi)
    pnw.Choice = lambda choices: ("choice", tuple(choices))

    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent
            self.layout = types.SimpleNamespace(widgets=[], addWidget=lambda w: self.layout.widgets.append(w))

        def setup(self):
            pass

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

        def getParameterNode(self):
            node = slicer.mrmlScene.GetSingletonNode("MedGMAESlicer", "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.vtkMRMLScriptedModuleNode()
                node.SetSingletonTag("MedGMAESlicer")
                node = slicer.mrmlScene.AddNode(node)
            return node

    class ScriptedLoadableModuleTest:
        def delayDisplay(self, message, msec=0):
            print(message)

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)

    qt = types.ModuleType("qt")
    qt.QTimer = lambda: FakeWidget("timer", "QTimer")
    qt.QIcon = lambda path: ("icon", path)

    errors = []

    @contextlib.contextmanager
    def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
        try:
            yield
        except Exception as exc:  # the app shows a dialog; record it
            errors.append(f"{message} {exc}")

    ui_root = FakeWidget("MedGMAESlicer", "qMRMLWidget")
    monkeypatch.setitem(sys.modules, "qt", qt)
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slm)
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", pnw)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(processEvents=lambda: None, slicerHome="/nonexistent"),
                        raising=False)
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: ui_root)
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda root: fake_ui(path=REPO / "Resources" / "UI" / "MedGMAESlicer.ui"))
    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", tryWithErrorDisplay)
    parameters.parameter_node_wrapper_class.cache_clear()
    monkeypatch.syspath_prepend(str(REPO / "MedGMAESlicer"))
    sys.modules.pop("MedGMAESlicer", None)
    mod = importlib.import_module("MedGMAESlicer")
    yield mod, errors
    sys.modules.pop("MedGMAESlicer", None)
    parameters.parameter_node_wrapper_class.cache_clear()


def test_widget_mask_predict_display_and_train(widget_module, session, tiny_checkpoint, tmp_path):
    from MedGMAESlicerLib.logic import add_volume
    from MedGMAESlicerLib.selftest import blob_volume, oblique_lps_affine

    mod, errors = widget_module
    parent = types.SimpleNamespace()
    mod.MedGMAESlicer(parent)
    assert parent.title == "MedGMAE" and parent.icon[1].endswith("MedGMAESlicer.png")
    volume = add_volume(session.scene, blob_volume(), oblique_lps_affine(), "ct")
    widget = mod.MedGMAESlicerWidget()
    widget.setup()
    ui, params = widget.ui, widget._parameterNode
    assert params.inputVolume is volume  # the first volume is picked
    assert ui.predictButton.enabled and not ui.exportPlyButton.enabled

    ui.previewMaskButton.clicked.emit()
    assert errors == [] and ui.maskStatusLabel.text.startswith("Masked")

    params.checkpointPath = tiny_checkpoint
    params.maskRatio = 0.5
    ui.predictButton.clicked.emit()
    assert errors == [], errors
    assert "24 Gaussians over one model window" in ui.predictStatusLabel.text
    assert ui.predictButton.text == "Predict" and ui.exportPlyButton.enabled
    prediction = widget.logic.last_prediction
    params.glyphSigma = 3  # a parameter change re-draws the glyphs
    assert prediction.glyph.sigma == 3 and prediction.glyph_key[2] == 3
    params.exportDirectory = tmp_path
    ui.exportPlyButton.clicked.emit()
    assert errors == [] and (tmp_path / "ct_gaussians.ply").is_file()

    params.trainDataFolder = tmp_path / "missing"
    params.trainOutputFolder = tmp_path / "run"
    ui.trainButton.clicked.emit()
    assert ui.trainButton.text == "Start training" and "does not exist" in ui.trainStatusLabel.text
    assert widget.jobTimer.active
    widget.cleanup()
    assert not widget.jobTimer.active
    assert np.isfinite(prediction.intensities).all()
