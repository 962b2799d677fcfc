"""The .ui file: loads with PySide6's QUiLoader without undeclared classes, and matches the widget code."""
from __future__ import annotations

import os
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
QtCore = pytest.importorskip("PySide6.QtCore")
QtWidgets = pytest.importorskip("PySide6.QtWidgets")
QtUiTools = pytest.importorskip("PySide6.QtUiTools")

REPO = Path(__file__).resolve().parents[2]
UI_FILE = REPO / "Resources" / "UI" / "MedGMAESlicer.ui"
CODE_FILES = [REPO / "MedGMAESlicer" / "MedGMAESlicer.py", *sorted((REPO / "MedGMAESlicer" / "MedGMAESlicerLib").glob("*.py"))]
sys.path.insert(0, str(REPO / "MedGMAESlicer"))

from MedGMAESlicerLib.parameters import Choice, Node, Range, field_specs  # noqa: E402

# Which widget classes the parameterNodeWrapper can bind to each parameter type (Slicer's guiConnectors).
BINDABLE = {int: {"QSpinBox", "QSlider", "QComboBox"}, float: {"ctkSliderWidget", "QDoubleSpinBox", "QComboBox"},
            str: {"QComboBox", "QLineEdit"}, bool: {"QCheckBox"}, Path: {"ctkPathLineEdit", "ctkDirectoryButton"}}


@pytest.fixture(scope="module")
def loaded():
    messages = []
    previous = QtCore.qInstallMessageHandler(lambda mode, ctx, msg: messages.append(msg))
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    f = QtCore.QFile(str(UI_FILE))
    assert f.open(QtCore.QFile.ReadOnly), f"cannot open {UI_FILE}"
    widget = QtUiTools.QUiLoader().load(f)
    f.close()
    QtCore.qInstallMessageHandler(previous)
    yield app, widget, messages


def _declared_custom_classes(tree) -> set[str]:
    return {c.findtext("class") for c in tree.getroot().iter("customwidget")}


def test_ui_loads_without_undeclared_classes(loaded):
    _, widget, messages = loaded
    assert widget is not None and widget.objectName() == "MedGMAESlicer"
    tree = ET.parse(UI_FILE)
    declared = _declared_custom_classes(tree)
    assert {"qMRMLWidget", "ctkCollapsibleButton", "qMRMLNodeComboBox", "ctkSliderWidget", "ctkPathLineEdit"} <= declared
    scene_signal = "mrmlSceneChanged(vtkMRMLScene*)"
    unexpected = []
    for msg in messages:
        m = re.search(r"custom widget of the class '(\w+)'; defaulting to base class", msg)
        if m and m.group(1) in declared:
            continue  # declared Slicer/CTK class replaced by its Qt base: expected without Slicer
        if f"No such signal QWidget::{scene_signal}" in msg or re.match(r"QObject::connect:\s+\((sender|receiver) name", msg):
            continue  # the stand-in root QWidget has no MRML scene signal; checked below instead
        unexpected.append(msg)
    assert unexpected == [], f"Qt reported problems loading {UI_FILE.name}: {unexpected}"
    # Every widget class used is a Qt class or declared in <customwidgets>.
    used = {w.get("class") for w in tree.getroot().iter("widget")}
    undeclared = {c for c in used if not c.startswith("Q") and c not in declared}
    assert undeclared == set()
    # The scene connections go from the root to MRML-aware widgets that exist.
    classes = {w.get("name"): w.get("class") for w in tree.getroot().iter("widget")}
    for conn in tree.getroot().iter("connection"):
        assert conn.findtext("sender") == "MedGMAESlicer" and conn.findtext("signal") == scene_signal
        receiver = conn.findtext("receiver")
        assert classes.get(receiver, "").startswith(("qMRML", "qSlicer")), receiver


def _names_used_in_code() -> set[str]:
    names = set()
    for path in CODE_FILES:
        names |= set(re.findall(r"\bself\.ui\.(\w+)", path.read_text()))
    return names


def test_every_object_name_the_code_uses_exists(loaded):
    _, widget, _ = loaded
    used = _names_used_in_code()
    assert len(used) >= 15, "parsing self.ui.<name> found too little; did the widget code move?"
    missing = sorted(n for n in used if widget.findChild(QtCore.QObject, n) is None)
    assert missing == [], f"object names used in code but missing from {UI_FILE.name}: {missing}"


def test_every_parameter_is_bound_to_one_suitable_widget(loaded):
    _, widget, _ = loaded
    tree = ET.parse(UI_FILE)
    bound = {}
    for w in tree.getroot().iter("widget"):
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                name = p.findtext("string")
                assert name not in bound, f"parameter {name} bound to two widgets"
                bound[name] = (w.get("class"), w.get("name"), w)
    specs = field_specs()
    assert set(bound) == set(specs), f"unbound: {set(specs) - set(bound)}; unknown: {set(bound) - set(specs)}"
    for name, (cls, obj_name, element) in bound.items():
        kind, marker = specs[name]
        # the loaded widget keeps the dynamic property
        assert widget.findChild(QtCore.QObject, obj_name).property("SlicerParameterName") == name
        if isinstance(marker, Node):
            assert cls == "qMRMLNodeComboBox", name
            types = [s.text for p in element.findall("property") if p.get("name") == "nodeTypes" for s in p.iter("string")]
            assert types == [marker.class_name], (name, types)
            continue
        assert cls in BINDABLE[kind], f"{name} ({kind.__name__}) cannot bind to a {cls}"
        if cls == "QComboBox":
            assert isinstance(marker, Choice), f"{name}: a QComboBox needs a Choice annotation"
            items = [s.text for item in element.findall("item") for s in item.iter("string")]
            assert items == [str(c) for c in marker.choices], (name, items)
        if cls in ("ctkSliderWidget", "QSlider"):
            assert isinstance(marker, Range), f"{name}: a slider needs a Range annotation"


def test_apply_buttons_and_progress_bars_exist(loaded):
    _, widget, _ = loaded
    for panel in ("maskCollapsibleButton", "predictCollapsibleButton", "trainCollapsibleButton",
                  "reconCollapsibleButton", "installCollapsibleButton"):
        assert widget.findChild(QtCore.QObject, panel) is not None, panel
    for bar in ("predictProgressBar", "trainProgressBar", "reconProgressBar"):
        assert isinstance(widget.findChild(QtCore.QObject, bar), QtWidgets.QProgressBar), bar


def test_widget_calls_only_existing_logic_methods():
    """The module file is wiring only: every ``self.logic.<name>`` / ``self.installLogic.<name>`` it calls exists."""
    from MedGMAESlicerLib.install import InstallLogic
    from MedGMAESlicerLib.logic import MedGMAELogic

    code = (REPO / "MedGMAESlicer" / "MedGMAESlicer.py").read_text()
    logic_names = set(re.findall(r"self\.logic\.(\w+)", code))
    install_names = set(re.findall(r"self\.installLogic\.(\w+)", code))
    assert {"predict_from_parameters", "preview_mask_from_parameters", "start_training_from_parameters"} <= logic_names
    logic = MedGMAELogic(scene=object())
    defined_here = set(re.findall(r"def (\w+)\(", code))  # e.g. getParameterNode on the module's Logic class
    assert sorted(n for n in logic_names - defined_here if not hasattr(logic, n)) == []
    assert sorted(n for n in install_names if not hasattr(InstallLogic, n)) == []
    assert len(code.splitlines()) < 200, "MedGMAESlicer.py should stay thin"


def test_cmake_lists_every_script_and_resource():
    cmake = (REPO / "MedGMAESlicer" / "CMakeLists.txt").read_text()
    listed = set(re.findall(r"\$\{MODULE_NAME\}Lib/(\w+\.py)", cmake))
    on_disk = {p.name for p in (REPO / "MedGMAESlicer" / "MedGMAESlicerLib").glob("*.py")}
    assert listed == on_disk, f"missing from CMakeLists: {on_disk - listed}; listed but absent: {listed - on_disk}"
    assert "slicerMacroBuildScriptedModule" in cmake and "WITH_GENERIC_TESTS" in cmake
    resources = re.findall(r"(UI|Icons)/\$\{MODULE_NAME\}\.(ui|png)", cmake)
    assert {r[0] for r in resources} == {"UI", "Icons"}
    assert (REPO / "Resources" / "Icons" / "MedGMAESlicer.png").stat().st_size > 500 and UI_FILE.is_file()
