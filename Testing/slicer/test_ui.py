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
UI_FILE = REPO / "MedGMAESlicer" / "Resources" / "UI" / "MedGMAESlicer.ui"
CODE_FILES = [REPO / "MedGMAESlicer" / "MedGMAESlicer.py", *sorted((REPO / "MedGMAESlicer" / "MedGMAESlicerLib").glob("*.py"))]
sys.path.insert(0, str(REPO / "MedGMAESlicer"))

from MedGMAESlicerLib.parameters import Choice, LabeledEnum, Node, PathField, Range, field_specs  # noqa: E402

# Which widget classes the parameterNodeWrapper can bind to each parameter type (Slicer's guiConnectors.py, plus
# the module's own ctkPathLineEdit <-> str connector for PathField parameters).
BINDABLE = {int: {"QSpinBox", "QSlider", "QComboBox"}, float: {"ctkSliderWidget", "QDoubleSpinBox", "QComboBox"},
            str: {"QComboBox", "QLineEdit"}, bool: {"QCheckBox"}, Path: {"ctkPathLineEdit", "ctkDirectoryButton"},
            PathField: {"ctkPathLineEdit"}, LabeledEnum: {"QComboBox"}}


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
        if re.fullmatch(r"Designer: The set-type property (filters|options) could not be read\.", msg):
            continue  # ctkPathLineEdit's own flags; the QWidget standing in for it has none (checked below)
        unexpected.append(msg)
    assert unexpected == [], f"Qt reported problems loading {UI_FILE.name}: {unexpected}"
    # The ctkPathLineEdit flags are spelled as Slicer's own .ui files spell them (e.g. qSlicerDICOMExportDialog.ui)
    for w in tree.getroot().iter("widget"):
        for prop in w.findall("property"):
            if prop.get("name") in ("filters", "options") and prop.find("set") is not None:
                assert w.get("class") == "ctkPathLineEdit", w.get("name")
                flags = prop.findtext("set").split("|")
                assert all(re.fullmatch(r"ctkPathLineEdit::[A-Z][A-Za-z]+", f) for f in flags), flags
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
        names |= set(re.findall(r"\b(?:self\.)?ui\.(\w+)", path.read_text()))
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
        if isinstance(marker, PathField):
            assert cls in BINDABLE[PathField], f"{name} (a path) cannot bind to a {cls}"
            continue
        if isinstance(kind, type) and issubclass(kind, LabeledEnum):
            assert cls in BINDABLE[LabeledEnum], name
            items = [s.text for item in element.findall("item") for s in item.iter("string")]
            assert items == [m.label() for m in kind], (name, items)  # what the wrapper will show
            assert all(m.label() != m.value for m in kind), f"{name}: labels should be words, not the tokens"
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
    """The module file is wiring only; the panel calls logic, install and panel methods that exist."""
    from MedGMAESlicerLib.install import InstallLogic
    from MedGMAESlicerLib.logic import MedGMAELogic
    from MedGMAESlicerLib.panel import MedGMAEPanel

    module_code = (REPO / "MedGMAESlicer" / "MedGMAESlicer.py").read_text()
    panel_code = (REPO / "MedGMAESlicer" / "MedGMAESlicerLib" / "panel.py").read_text()
    logic_names = set(re.findall(r"self\.logic\.(\w+)", panel_code))
    install_names = set(re.findall(r"self\.install_logic\.(\w+)", panel_code))
    panel_names = set(re.findall(r"self\.panel\.(\w+)", module_code))
    assert {"start_prediction", "finish_prediction", "preview_mask_from_parameters",
            "start_training_from_parameters", "start_reconstruction_from_parameters"} <= logic_names
    logic = MedGMAELogic(scene=object())
    assert sorted(n for n in logic_names if not hasattr(logic, n)) == []
    assert install_names and sorted(n for n in install_names if not hasattr(InstallLogic, n)) == []
    assert panel_names and sorted(n for n in panel_names if not hasattr(MedGMAEPanel, n)) == []
    assert len(module_code.splitlines()) < 200, "MedGMAESlicer.py should stay thin"


def test_resources_live_in_the_module_folder():
    """Slicer finds a module's resources in <module folder>/Resources (ScriptedLoadableModule.resourcePath, the
    icon lookup, Edit UI); the CMakeLists install them from there."""
    module = REPO / "MedGMAESlicer"
    cmake = (module / "CMakeLists.txt").read_text()
    assert "RESOURCES ${MODULE_PYTHON_RESOURCES}" in cmake and "WITH_GENERIC_TESTS" in cmake
    assert (module / "Resources" / "Icons" / "MedGMAESlicer.png").stat().st_size > 500 and UI_FILE.is_file()
    assert not (REPO / "Resources").exists()
