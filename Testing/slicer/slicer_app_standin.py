"""Stand-ins for the parts of 3D Slicer that slicer-core does not have: PythonQt's ``qt``, ``ctk``, ``slicer.app``,
``slicer.ScriptedLoadableModule``, ``slicer.parameterNodeWrapper`` and ``slicer.i18n``.

They exist so the module file and its panel run here exactly as they are installed, on a real slicer-core MRML
scene and with slicer-core's real ``slicer.util`` (``loadUI``, ``childWidgetVariables``, ``tryWithErrorDisplay``,
``confirmOkCancelDisplay``, ``setSliceViewerLayers``, ``VTKObservationMixin``... are *not* replaced). Each
stand-in copies the behaviour of the real code it replaces, as read in Slicer's sources (v5.10.0 tag, the minimum
this module supports); the file each one mirrors is named in its docstring. In particular:

- widgets emit their change signals when a value is set programmatically, as Qt does;
- ``slicer.util.tryWithErrorDisplay`` is slicer-core's own: it shows (here: logs) the error *and re-raises*;
- message boxes (``ctk.ctkMessageBox.exec_``) answer from a queue the test fills; an unexpected dialog fails;
- the parameter node wrapper stores values the way its serializers do (enums by name, bools as "True"/"False",
  paths as ``str(path)``, so an empty ``pathlib.Path`` reads back as ".") and binds widgets through registered GUI
  connectors in registration order, so the module's own ``ctkPathLineEdit``/``str`` connector is exercised.

This file must not import torch or medgmae_core: it also runs in a Python that has neither.
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import pathlib
import sys
import types
import typing
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Annotated, Any

log = logging.getLogger("slicer_app_standin")


# ============================================================================ qt (PythonQt)
class Signal:
    """A PythonQt signal: ``connect(slot)``, ``disconnect(slot)``; ``emit`` is what Qt does when the value changes."""

    def __init__(self):
        self.slots = []

    def connect(self, slot):
        self.slots.append(slot)

    def disconnect(self, slot=None):
        if slot is None:
            self.slots.clear()
        elif slot in self.slots:
            self.slots.remove(slot)

    def emit(self, *args):
        for slot in list(self.slots):
            slot(*args)


class QObject:
    """PythonQt exposes ``objectName`` as ``name`` and Qt properties as attributes; dynamic properties (``stdset="0"``
    in a .ui file, e.g. ``SlicerParameterName``) through ``property()``/``setProperty()``."""

    def __init__(self, parent=None):
        self._children: list = []
        self._dynamic: dict = {}
        self.name = ""
        if parent is not None:
            parent._children.append(self)

    def children(self):
        return list(self._children)

    def property(self, name):
        return self._dynamic.get(name)

    def setProperty(self, name, value):
        self._dynamic[name] = value

    def className(self):
        return type(self).__name__

    def findChildren(self, cls=None):
        found = []
        for child in self._children:
            if cls is None or isinstance(child, cls):
                found.append(child)
            found += child.findChildren(cls)
        return found

    def deleteLater(self):
        pass

    def __getattr__(self, name):  # setText(x), setEnabled(x), setToolTip(x)...: PythonQt property setters
        if name.startswith("set") and len(name) > 3 and name[3].isupper():
            attribute = name[3].lower() + name[4:]
            return lambda value: setattr(self, attribute, value)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")


class _Layout:
    def __init__(self, owner):
        self.owner = owner

    def addWidget(self, widget, *args):
        self.owner._children.append(widget)


class QWidget(QObject):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.enabled, self.visible, self.toolTip = True, True, ""
        self._layout = _Layout(self)

    def isWidgetType(self):
        return True

    def layout(self):
        return self._layout

    def show(self):
        self.visible = True

    def hide(self):
        self.visible = False


class QLabel(QWidget):
    def __init__(self, text="", parent=None):
        super().__init__(parent)
        self.text, self.wordWrap = text, False


class QPushButton(QWidget):
    def __init__(self, text="", parent=None):
        super().__init__(parent)
        self.text, self.checkable = text, False
        self.clicked = Signal()

    def click(self):
        if self.enabled and self.visible is not None:
            self.clicked.emit()


class QCheckBox(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.text = ""
        self._checked = False
        self.stateChanged, self.toggled = Signal(), Signal()

    @property
    def checked(self):
        return self._checked

    @checked.setter
    def checked(self, value):
        if bool(value) != self._checked:
            self._checked = bool(value)
            self.stateChanged.emit(2 if value else 0)
            self.toggled.emit(self._checked)


class _ValueWidget(QWidget):
    """QSpinBox / QDoubleSpinBox / ctkSliderWidget: ``value`` clamped to [minimum, maximum], ``valueChanged``."""
    kind: type = float

    def __init__(self, parent=None):
        super().__init__(parent)
        self.minimum, self.maximum = 0, 99
        self.singleStep, self.decimals = 1, 2
        self._value = self.kind(0)
        self.valueChanged = Signal()

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, v):
        v = self.kind(min(max(v, self.minimum), self.maximum))
        if v != self._value:
            self._value = v
            self.valueChanged.emit(v)

    def setRange(self, lo, hi):
        self.minimum, self.maximum = lo, hi


class QSpinBox(_ValueWidget):
    kind = int


class QDoubleSpinBox(_ValueWidget):
    kind = float


class QSlider(_ValueWidget):
    kind = int


class QComboBox(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.items: list[str] = []
        self._index = -1
        self.currentIndexChanged = Signal()

    def addItem(self, text, *args):
        self.items.append(str(text))
        if self._index < 0:
            self.currentIndex = 0

    def clear(self):
        self.items = []
        self.currentIndex = -1

    @property
    def count(self):
        return len(self.items)

    @property
    def currentText(self):
        return self.items[self._index] if 0 <= self._index < len(self.items) else ""

    @property
    def currentIndex(self):
        return self._index

    @currentIndex.setter
    def currentIndex(self, index):
        index = int(index) if 0 <= int(index) < len(self.items) else -1
        if index != self._index:
            self._index = index
            self.currentIndexChanged.emit(index)


class QProgressBar(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.value, self.minimum, self.maximum = 0, 0, 100


class QGroupBox(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.title = ""


class QTimer(QObject):
    """``qt.QTimer``: the test fires it (``fire()``) where the event loop would."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.interval, self.singleShot, self.active = 0, False, False
        self.timeout = Signal()

    def setInterval(self, ms):
        self.interval = ms

    def setSingleShot(self, single):
        self.singleShot = single

    def start(self, ms=None):
        if ms is not None:
            self.interval = ms
        self.active = True

    def stop(self):
        self.active = False

    def isActive(self):
        return self.active

    def fire(self):
        """What the event loop does when the interval has passed."""
        if self.active:
            if self.singleShot:
                self.active = False
            self.timeout.emit()


class QMessageBox:
    # QMessageBox::StandardButton and ::Icon values (Qt's qmessagebox.h)
    Ok, Cancel, Yes, No = 0x00000400, 0x00400000, 0x00004000, 0x00010000
    NoIcon, Information, Warning, Critical, Question = 0, 1, 2, 3, 4


class QCursor:
    def __init__(self, shape):
        self._shape = shape

    def shape(self):
        return self._shape


class QApplication:
    """The override-cursor stack ``slicer.util._temporaryNormalCursor`` and ``tryWithErrorDisplay`` use."""
    _cursors: list = []

    @classmethod
    def setOverrideCursor(cls, cursor):
        cls._cursors.append(cursor if isinstance(cursor, QCursor) else QCursor(cursor))

    @classmethod
    def restoreOverrideCursor(cls):
        if cls._cursors:
            cls._cursors.pop()

    @classmethod
    def overrideCursor(cls):
        return cls._cursors[-1] if cls._cursors else None


class QFile:
    """As ``slicer.util.loadUI`` uses it (Base/Python/slicer/util.py): ``exists()``, ``open(mode)``."""
    ReadOnly = 1

    def __init__(self, path):
        self.path = str(path)

    def exists(self):
        return Path(self.path).is_file()

    def open(self, mode):
        return self.exists()


class QIcon:
    def __init__(self, path=""):
        self.path = str(path)


class _QtNamespace:
    WaitCursor, BusyCursor = 3, 16
    TextSelectableByMouse = 1


# ============================================================================ ctk
class ctkSliderWidget(_ValueWidget):
    kind = float

    def __init__(self, parent=None):
        super().__init__(parent)
        self.tracking = True


class ctkPathLineEdit(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._path = ""
        self.nameFilters, self.filters, self.options = [], 0, 0
        self.currentPathChanged = Signal()

    @property
    def currentPath(self):
        return self._path

    @currentPath.setter
    def currentPath(self, path):
        if str(path) != self._path:
            self._path = str(path)
            self.currentPathChanged.emit(self._path)


class ctkCollapsibleButton(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.text, self.collapsed = "", False


class ctkCollapsibleGroupBox(QGroupBox):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.collapsed = False


class ctkMessageBox(QWidget):
    """What ``slicer.util.messageBox`` shows; ``exec_`` answers from :attr:`StandInApp.answers`."""

    def __init__(self, parent=None):
        super().__init__(None)
        self.text, self.windowTitle, self.detailedText = "", "", ""
        self.icon, self.standardButtons = 0, 0

    def exec_(self):
        app = _current_app
        dialog = {"text": self.text, "title": self.windowTitle.strip(), "detail": self.detailedText,
                  "buttons": self.standardButtons}
        app.dialogs.append(dialog)
        if not app.answers:
            raise AssertionError(f"unexpected dialog: {dialog}")
        return app.answers.pop(0)


# ============================================================================ slicer's Qt widgets
class qMRMLWidget(QWidget):
    """Root of the module's .ui: ``setMRMLScene`` emits ``mrmlSceneChanged`` (the .ui connects it to its children)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.mrmlSceneChanged = Signal()
        self.scene = None

    def setMRMLScene(self, scene):
        self.scene = scene
        self.mrmlSceneChanged.emit(scene)


class qSlicerWidget(qMRMLWidget):
    pass


class qMRMLNodeComboBox(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.nodeTypes, self.scene, self._node = [], None, None
        self.currentNodeChanged = Signal()
        self.noneEnabled = self.addEnabled = self.removeEnabled = self.renameEnabled = False

    def setMRMLScene(self, scene):
        self.scene = scene

    def currentNode(self):
        if self._node is not None and self._node.GetScene() is None:
            self._node = None  # the combo box forgets nodes removed from the scene
        return self._node

    @property
    def currentNodeID(self):
        node = self.currentNode()
        return node.GetID() if node is not None else None

    def setCurrentNode(self, node):
        if node is not self._node:
            self._node = node
            self.currentNodeChanged.emit(node)


class qSlicerMarkupsPlaceWidget(qSlicerWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.currentNode = None

    def setCurrentNode(self, node):
        self.currentNode = node


WIDGET_CLASSES = {cls.__name__: cls for cls in (
    QWidget, QLabel, QPushButton, QCheckBox, QSpinBox, QDoubleSpinBox, QSlider, QComboBox, QProgressBar, QGroupBox,
    ctkSliderWidget, ctkPathLineEdit, ctkCollapsibleButton, ctkCollapsibleGroupBox,
    qMRMLWidget, qSlicerWidget, qMRMLNodeComboBox, qSlicerMarkupsPlaceWidget)}


class QUiLoader:
    """Builds the widget tree of a .ui file (what ``slicer.util.loadUI`` gets from Qt's QUiLoader): every class must
    be known (Qt drops undeclared classes; here that is an error), properties become attributes, ``stdset="0"``
    properties dynamic ones, combo items items, and the file's signal/slot connections are made."""

    def load(self, qfile):
        root = ET.parse(qfile.path).getroot()
        widgets = {}

        def value(prop):
            child = prop[0]
            if child.tag == "string":
                return child.text or ""
            if child.tag == "bool":
                return child.text == "true"
            if child.tag == "number":
                return int(child.text)
            if child.tag == "double":
                return float(child.text)
            if child.tag == "stringlist":
                return [s.text or "" for s in child]
            return child.text

        def build(elem, parent):
            cls = WIDGET_CLASSES.get(elem.get("class"))
            if cls is None:
                raise RuntimeError(f"{qfile.path}: widget class {elem.get('class')!r} is not available")
            widget = cls(parent=parent)
            widget.name = elem.get("name")
            widgets[widget.name] = widget
            for child in elem:
                if child.tag == "property":
                    if child.get("stdset") == "0":
                        widget.setProperty(child.get("name"), value(child))
                    else:
                        setattr(widget, child.get("name"), value(child))
                elif child.tag == "item" and isinstance(widget, QComboBox):
                    widget.addItem(value(child.find("property")))
                elif child.tag == "widget":
                    build(child, widget)
                elif child.tag == "layout":
                    walk_layout(child, widget)
            return widget

        def walk_layout(layout, owner):
            for item in layout.findall("item"):
                for child in item:
                    if child.tag == "widget":
                        build(child, owner)
                    elif child.tag == "layout":
                        walk_layout(child, owner)

        top = build(root.find("widget"), None)
        for conn in root.iter("connection"):
            sender, receiver = widgets[conn.findtext("sender")], widgets[conn.findtext("receiver")]
            signal = conn.findtext("signal").split("(")[0]
            slot = conn.findtext("slot").split("(")[0]
            getattr(sender, signal).connect(getattr(receiver, slot))
        return top


# ============================================================================ slicer.app
class _SliceLogics:
    """vtkCollection-like list of slice logics (``layoutManager().mrmlSliceLogics()``)."""

    def __init__(self, logics):
        self.logics = logics

    def GetNumberOfItems(self):
        return len(self.logics)

    def GetItemAsObject(self, i):
        return self.logics[i]


class _SliceLogic:
    def __init__(self):
        self.fits = 0

    def FitSliceToBackground(self):
        self.fits += 1


class LayoutManager:
    def __init__(self):
        self.slice_logics = [_SliceLogic() for _ in range(3)]

    def mrmlSliceLogics(self):
        return _SliceLogics(self.slice_logics)


class StandInApp:
    """``slicer.app`` (qSlicerApplication) as far as the module and slicer.util use it."""

    def __init__(self, *, testing: bool = False, version=(5, 10), slicer_home: str = "/nonexistent",
                 main_window: bool = True):
        self.testing = testing
        self.majorVersion, self.minorVersion = version
        self.applicationName = "Slicer"
        self.slicerHome = slicer_home
        self.answers: list = []  # queued ctkMessageBox answers (qt.QMessageBox.Ok, ...)
        self.dialogs: list = []  # message boxes shown
        self.restarts = 0
        self._layout = LayoutManager() if main_window else None

    def testingEnabled(self):
        return self.testing

    def commandOptions(self):  # what PyTorchUtils reads: slicer.app.commandOptions().testingEnabled
        return types.SimpleNamespace(testingEnabled=self.testing, noMainWindow=self._layout is None)

    def setOverrideCursor(self, cursor):
        QApplication.setOverrideCursor(cursor)

    def restoreOverrideCursor(self):
        QApplication.restoreOverrideCursor()

    def processEvents(self):
        pass

    def topLevelWidgets(self):
        return []  # no qSlicerMainWindow: slicer.util.errorDisplay only logs (mainWindowNeeded)

    def layoutManager(self):
        return self._layout

    def translate(self, context, text):
        return text

    def restart(self):
        self.restarts += 1


_current_app: StandInApp | None = None
opened_widgets: list = []  # widgets set up by open_module / reload: tests clean them up (as the app does on exit)


# ============================================================================ slicer.ScriptedLoadableModule
def make_scripted_loadable_module():
    """Mirrors Base/Python/slicer/ScriptedLoadableModule.py (v5.10.0)."""
    import os

    import slicer

    mod = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent
            self.moduleName = self.__class__.__name__
            parent.title, parent.categories, parent.dependencies = "", [], []
            parent.contributors = ["Andras Lasso (PerkLab, Queen's University), Steve Pieper (Isomics)"]
            parent.helpText = parent.acknowledgementText = "This module was created from a template."
            module_dir = os.path.dirname(self.parent.path)  # the icon comes from Resources/Icons/<Name>.png
            for extension in (".svg", ".png"):
                icon = os.path.join(module_dir, "Resources/Icons", self.moduleName + extension)
                if os.path.isfile(icon):
                    parent.icon = QIcon(icon)
                    break
            if not hasattr(slicer, "selfTests"):
                slicer.selfTests = {}
            slicer.selfTests[self.moduleName] = self.runTest

        def resourcePath(self, filename):
            return os.path.join(os.path.dirname(self.parent.path), "Resources", filename)

        def runTest(self, msec=100, **kwargs):
            module = sys.modules[self.__module__]
            test = getattr(module, self.moduleName + "Test")()
            test.messageDelay = msec
            test.runTest(**kwargs)

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            super().__init__()
            self.moduleName = self.__class__.__name__[:-len("Widget")]
            self.developerMode = False
            self.parent = parent if parent is not None else qMRMLWidget()
            self.parent.isEntered = False
            self.layout = self.parent.layout()
            self.reloads = 0
            if parent is None:  # as the real class: without a parent the widget sets itself up and shows
                self.setup()
                self.parent.show()

        def resourcePath(self, filename):
            return os.path.join(os.path.dirname(slicer.util.modulePath(self.moduleName)), "Resources", filename)

        def setup(self):
            pass  # the developer section (Reload & Test) only in developer mode

        def cleanup(self):
            pass

        def onReload(self):
            """``slicer.util.reloadScriptedModule`` (Base/Python/slicer/util.py): re-execute the module file from its
            path, clean up this widget, and set up a new widget of the reloaded class in the same panel."""
            import importlib.util
            self.reloads += 1
            path = slicer.util.modulePath(self.moduleName)
            spec = importlib.util.spec_from_file_location(self.moduleName, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[self.moduleName] = module
            spec.loader.exec_module(module)
            self.cleanup()
            widget = getattr(module, self.moduleName + "Widget")(self.parent)
            widget.setup()
            setattr(slicer.modules, self.moduleName + "Widget", widget)
            opened_widgets.append(widget)

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            super().__init__()
            self.moduleName = self.__class__.__name__[:-len("Logic")]
            self.isSingletonParameterNode = True

        def getParameterNode(self):
            node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node:
                if node.GetAttribute("ModuleName") != self.moduleName:
                    node.SetAttribute("ModuleName", self.moduleName)
                return node
            return slicer.mrmlScene.AddNode(self.createParameterNode())

        def createParameterNode(self):
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.messages = []

        def runTest(self):  # unittest needs it; the module's Test class overrides it
            pass

        def delayDisplay(self, message, requestedDelay=None, msec=None):
            self.messages.append(message)
            log.info(message)

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(mod, cls.__name__, cls)
    mod.__all__ = [cls.__name__ for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget,
                                            ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest)]
    return mod


# ============================================================================ slicer.parameterNodeWrapper
def make_parameter_node_wrapper():
    """Mirrors Base/Python/slicer/parameterNodeWrapper/ (wrapper.py, serializers.py, guiConnectors.py, validators.py,
    util.py at v5.10.0) for the types and widgets this module uses."""
    import slicer

    mod = types.ModuleType("slicer.parameterNodeWrapper")

    # ---- util.py
    def splitAnnotations(datatype):
        if typing.get_origin(datatype) is Annotated:
            base, *annotations = typing.get_args(datatype)
            return base, list(annotations)
        return datatype, []

    def unannotatedType(datatype):
        return splitAnnotations(datatype)[0]

    def findFirstAnnotation(annotations, kind):
        return next((a for a in annotations if isinstance(a, kind)), None)

    # ---- validators.py
    class WithinRange:
        def __init__(self, minimum, maximum):
            self.minimum, self.maximum = minimum, maximum

        def validate(self, value):
            if not self.minimum <= value <= self.maximum:
                raise ValueError(f"Value must be within range [{self.minimum}, {self.maximum}], is {value}")

    class Choice:
        def __init__(self, choices):
            self.choices = choices

        def validate(self, value):
            if value not in self.choices:
                raise ValueError(f"Value '{value}' is not within the choices: [{self.choices}]")

    # ---- serializers.py: what is written to the node, and the default of each type
    PATH_TYPES = (pathlib.Path, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePath, pathlib.PurePosixPath,
                  pathlib.PureWindowsPath)

    class Serializer:
        def __init__(self, kind):
            self.kind = kind

        def isIn(self, node, name):
            return node.HasParameter(name)

        def default(self):
            if self.kind in (int, float):
                return 0
            if self.kind is str:
                return ""
            if self.kind is bool:
                return False
            if self.kind in PATH_TYPES:
                return self.kind()
            if isinstance(self.kind, type) and issubclass(self.kind, enum.Enum):
                return next(iter(self.kind))
            return None  # nodes

        def check(self, value):  # the IsInstance / NotNone validators of each serializer
            if self.is_node():
                if value is not None and not isinstance(value, self.kind):
                    raise TypeError(f"Expected type {self.kind}, got {type(value)}")
                return
            expected = (int, float) if self.kind is float else self.kind
            if value is None or not isinstance(value, expected):
                raise TypeError(f"Expected type {expected}, got {type(value)}")

        def is_node(self):
            return isinstance(self.kind, type) and issubclass(self.kind, slicer.vtkMRMLNode)

        def write(self, node, name, value):
            if self.is_node():
                node.SetParameter(name, "")
                node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            elif self.kind is bool:
                node.SetParameter(name, "True" if value else "False")
            elif isinstance(value, enum.Enum):
                node.SetParameter(name, value.name)
            else:
                node.SetParameter(name, str(value))

        def read(self, node, name):
            if self.is_node():
                return node.GetNodeReference(name)
            text = node.GetParameter(name)
            if self.kind is bool:
                return text == "True"
            if isinstance(self.kind, type) and issubclass(self.kind, enum.Enum):
                return self.kind[text]
            return self.kind(text)

    def createSerializer(kind):
        known = kind in (int, float, str, bool) or kind in PATH_TYPES or (
            isinstance(kind, type) and (issubclass(kind, enum.Enum) or issubclass(kind, slicer.vtkMRMLNode)))
        if not known:
            raise Exception(f"Unsupported type {kind}")
        return Serializer(kind)

    # ---- guiConnectors.py
    class GuiConnector:
        def __init__(self):
            self._callback = None

        def onChanged(self, callback):
            self._callback = callback
            self._disconnect() if callback is None else self._connect()

        def changed(self, *args):
            if self._callback:
                self._callback()

    registered = []

    def parameterNodeGuiConnector(classtype=None):
        def wrap(cls):
            if not issubclass(cls, GuiConnector):
                raise TypeError("Must be a GuiConnector subclass")
            registered.append(cls)
            return cls
        return wrap if classtype is None else wrap(classtype)

    def createGuiConnector(widget, datatype):
        for connector in registered:
            if connector.canRepresent(widget, datatype):
                return connector.create(widget, datatype)
        raise RuntimeError(f"Unable to create GUI connector from datatype '{datatype}' to widget type '{type(widget)}'.")

    def _simple(widget_types, data_test, signal, read, write, setup=None):
        class Connector(GuiConnector):
            @staticmethod
            def canRepresent(widget, datatype):
                return type(widget) in widget_types and data_test(unannotatedType(datatype))

            @classmethod
            def create(cls, widget, datatype):
                return cls(widget, datatype) if cls.canRepresent(widget, datatype) else None

            def __init__(self, widget, datatype):
                super().__init__()
                self._widget, self._datatype = widget, datatype
                if setup:
                    setup(widget, datatype)

            def _connect(self):
                getattr(self._widget, signal).connect(self.changed)

            def _disconnect(self):
                getattr(self._widget, signal).disconnect(self.changed)

            def widget(self):
                return self._widget

            def read(self):
                return read(self._widget, self._datatype)

            def write(self, value):
                write(self._widget, self._datatype, value)
        return Connector

    def _range_setup(widget, datatype):
        within = findFirstAnnotation(splitAnnotations(datatype)[1], WithinRange)
        if within is None and type(widget) in (ctkSliderWidget, QSlider):
            raise RuntimeError("Cannot have a connection to a slider where the type is unbounded.")
        if within is not None:
            widget.minimum, widget.maximum = within.minimum, within.maximum
        if unannotatedType(datatype) is int and type(widget) is ctkSliderWidget:
            widget.decimals = 0

    def _combo_setup_choices(widget, datatype):
        choice = findFirstAnnotation(splitAnnotations(datatype)[1], Choice)
        if choice is None:
            raise RuntimeError("ComboBoxToStringableConnector requires the Choice annotation to be used.")
        widget.clear()
        for c in choice.choices:
            widget.addItem(str(c))

    def _combo_setup_enum(widget, datatype):
        kind = unannotatedType(datatype)
        label = getattr(kind, "label", lambda e: e.name)
        widget._labelToEnum = [(label(e), e) for e in kind]
        widget.clear()
        for text, _member in widget._labelToEnum:
            widget.addItem(text)

    def _enum_write(widget, datatype, value):
        for index, (_text, member) in enumerate(widget._labelToEnum):
            if member == value:
                widget.currentIndex = index
                return
        raise ValueError(f"Unable to find value {value}")

    def _choice_write(widget, datatype, value):
        choices = findFirstAnnotation(splitAnnotations(datatype)[1], Choice).choices
        widget.currentIndex = list(choices).index(value)

    is_enum = lambda t: isinstance(t, type) and issubclass(t, enum.Enum)  # noqa: E731
    for connector in (
        _simple((QCheckBox,), lambda t: t is bool, "stateChanged", lambda w, d: w.checked,
                lambda w, d, v: setattr(w, "checked", v)),
        _simple((QSlider, QSpinBox), lambda t: t is int, "valueChanged", lambda w, d: int(w.value),
                lambda w, d, v: setattr(w, "value", v), _range_setup),
        _simple((QDoubleSpinBox, ctkSliderWidget), lambda t: t in (float, int), "valueChanged",
                lambda w, d: int(w.value) if unannotatedType(d) is int else w.value,
                lambda w, d, v: setattr(w, "value", v), _range_setup),
        _simple((QComboBox,), lambda t: t in (int, float, str, bool), "currentIndexChanged",
                lambda w, d: findFirstAnnotation(splitAnnotations(d)[1], Choice).choices[w.currentIndex],
                _choice_write, _combo_setup_choices),
        _simple((QComboBox,), is_enum, "currentIndexChanged", lambda w, d: w._labelToEnum[w.currentIndex][1],
                _enum_write, _combo_setup_enum),
        _simple((ctkPathLineEdit,), lambda t: t in PATH_TYPES, "currentPathChanged",
                lambda w, d: unannotatedType(d)(w.currentPath), lambda w, d, v: setattr(w, "currentPath", str(v))),
        _simple((qMRMLNodeComboBox,), lambda t: isinstance(t, type) and issubclass(t, slicer.vtkMRMLNode),
                "currentNodeChanged", lambda w, d: w.currentNode(), lambda w, d, v: w.setCurrentNode(v)),
    ):
        parameterNodeGuiConnector(connector)

    # ---- wrapper.py
    def parameterNodeWrapper(classtype=None):
        def wrap(cls):
            members = typing.get_type_hints(cls, include_extras=True)
            params = {}
            for name, datatype in members.items():
                kind, annotations = splitAnnotations(datatype)
                serializer = createSerializer(kind)
                validators = [a for a in annotations if isinstance(a, (WithinRange, Choice))]
                unused = [a for a in annotations if a not in validators]
                if unused:
                    logging.warning(f"Unused annotations: {unused}")
                default = getattr(cls, name) if hasattr(cls, name) else serializer.default()
                params[name] = (serializer, validators, default, datatype)

            def make_property(name):
                serializer, validators, _default, _dt = params[name]

                def getter(self):
                    return serializer.read(self.parameterNode, name)

                def setter(self, value):
                    serializer.check(value)
                    for validator in validators:
                        validator.validate(value)
                    wasModifying = self.parameterNode.StartModify()
                    try:
                        serializer.write(self.parameterNode, name, value)
                    finally:
                        self.parameterNode.EndModify(wasModifying)
                return property(getter, setter)

            def __init__(self, parameterNode):
                self.parameterNode = parameterNode
                self._guis, self._next_tag, self._updating = {}, 0, False
                for name, (serializer, _v, default, _dt) in params.items():
                    if not serializer.isIn(parameterNode, name):
                        serializer.write(parameterNode, name, default)

            def _update_gui(self):
                if self._updating:
                    return
                self._updating = True
                try:
                    for mapping in self._guis.values():
                        for name, connector in mapping.items():
                            connector.write(getattr(self, name))
                finally:
                    self._updating = False

            def connectGui(self, gui):
                widgets = {}
                candidates = gui.findChildren(QWidget) if getattr(gui, "isWidgetType", lambda: False)() \
                    else list(vars(gui).values())
                for widget in candidates:
                    name = widget.property("SlicerParameterName") if hasattr(widget, "property") else None
                    if name:
                        if name not in params:
                            raise ValueError(f"Cannot find a param with the given name: {name}")
                        widgets[name] = widget
                mapping = {name: createGuiConnector(w, params[name][3]) for name, w in widgets.items()}
                tag = self._next_tag
                self._next_tag += 1
                self._guis[tag] = mapping
                for name, connector in mapping.items():
                    connector.write(getattr(self, name))

                    def callback(name=name, connector=connector):
                        if not self._updating:
                            setattr(self, name, connector.read())
                    connector.onChanged(callback)
                self.parameterNode.AddObserver(vtk_modified(), lambda caller, event: _update_gui(self))
                return tag

            def disconnectGui(self, tag):
                for connector in self._guis.pop(tag, {}).values():
                    connector.onChanged(None)

            namespace = {name: make_property(name) for name in params}
            namespace.update(
                __init__=__init__, connectGui=connectGui, disconnectGui=disconnectGui, allParameters=params,
                StartModify=lambda self: self.parameterNode.StartModify(),
                EndModify=lambda self, was: self.parameterNode.EndModify(was),
                AddObserver=lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(
                    event, callback, priority),
                RemoveObserver=lambda self, tag: self.parameterNode.RemoveObserver(tag),
                Modified=lambda self: self.parameterNode.Modified())
            return type(cls.__name__, (), namespace)
        return wrap if classtype is None else wrap(classtype)

    for name, obj in dict(locals()).items():
        if not name.startswith("_") and name not in ("mod", "slicer", "connector"):
            setattr(mod, name, obj)
    mod.registered_connectors = registered
    return mod


def close_opened_widgets():
    """What the app does on exit (``moduleAboutToBeUnloaded``): ``cleanup()`` every widget still open."""
    while opened_widgets:
        widget = opened_widgets.pop()
        try:
            widget.cleanup()
        except Exception:  # noqa: BLE001 - already cleaned up, or half set up: nothing left to release
            log.debug("cleanup of %r failed", widget, exc_info=True)


def vtk_modified():
    import vtk
    return vtk.vtkCommand.ModifiedEvent


# ============================================================================ installing the stand-ins
class Patcher:
    """``setitem``/``setattr`` with undo (pytest's ``monkeypatch`` has the same interface)."""

    def __init__(self):
        self._undo = []

    def setitem(self, mapping, key, value):
        self._undo.append((mapping.__setitem__, key, mapping[key]) if key in mapping else (mapping.pop, key, None))
        mapping[key] = value

    def setattr(self, target, name, value, raising=True):
        old = getattr(target, name, _MISSING)
        self._undo.append((target, name, old))
        setattr(target, name, value)

    def undo(self):
        for entry in reversed(self._undo):
            if callable(entry[0]):
                fn, key, value = entry
                fn(key) if fn.__name__ == "pop" else fn(key, value)
            else:
                target, name, old = entry
                delattr(target, name) if old is _MISSING else setattr(target, name, old)
        self._undo.clear()


_MISSING = object()


def install(patch, *, module_path: str | Path | None = None, testing: bool = False, version=(5, 10),
            main_window: bool = True) -> StandInApp:
    """Put the stand-ins in place on the real (slicer-core) ``slicer`` package; returns the ``slicer.app``.

    ``module_path``: the module file, registered as ``slicer.modules.medgmaeslicer.path`` (what the app's module
    factory does), which ``resourcePath`` and the icon lookup use."""
    global _current_app
    import slicer

    app = StandInApp(testing=testing, version=version, main_window=main_window)
    _current_app = app
    qt = types.ModuleType("qt")
    for cls in (Signal, QObject, QWidget, QLabel, QPushButton, QCheckBox, QSpinBox, QDoubleSpinBox, QSlider, QComboBox,
                QProgressBar, QGroupBox, QTimer, QMessageBox, QCursor, QApplication, QFile, QIcon, QUiLoader):
        setattr(qt, cls.__name__, cls)
    qt.Qt = _QtNamespace
    ctk = types.ModuleType("ctk")
    for cls in (ctkSliderWidget, ctkPathLineEdit, ctkCollapsibleButton, ctkCollapsibleGroupBox, ctkMessageBox):
        setattr(ctk, cls.__name__, cls)
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text  # no translation catalogue loaded: the text itself, as Slicer in English
    i18n.translate = lambda context, text: app.translate(context, text)

    patch.setitem(sys.modules, "qt", qt)
    patch.setitem(sys.modules, "ctk", ctk)
    patch.setitem(sys.modules, "slicer.i18n", i18n)
    patch.setattr(slicer, "i18n", i18n, raising=False)
    patch.setattr(slicer, "app", app, raising=False)
    for cls in (qMRMLWidget, qSlicerWidget, qMRMLNodeComboBox, qSlicerMarkupsPlaceWidget):
        patch.setattr(slicer, cls.__name__, cls, raising=False)
    slm = make_scripted_loadable_module()
    patch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slm)
    patch.setattr(slicer, "ScriptedLoadableModule", slm, raising=False)
    pnw = make_parameter_node_wrapper()
    patch.setitem(sys.modules, "slicer.parameterNodeWrapper", pnw)
    patch.setattr(slicer, "parameterNodeWrapper", pnw, raising=False)
    modules = types.SimpleNamespace()
    if module_path is not None:
        modules.medgmaeslicer = types.SimpleNamespace(path=str(module_path))
    patch.setattr(slicer, "modules", modules, raising=False)
    return app


def load_module_file(path: str | Path, name: str = "MedGMAESlicer"):
    """Import a scripted module from its file, as Slicer's scripted module factory does (its folder on sys.path)."""
    import importlib.util
    folder = str(Path(path).resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def module_parent(path: str | Path):
    """The ``parent`` a scripted module's constructor receives (qSlicerScriptedLoadableModule): has ``path``."""
    return types.SimpleNamespace(path=str(path), icon=None)


@dataclasses.dataclass
class WidgetSession:
    module: Any
    widget: Any
    app: StandInApp


def open_module(module_file: str | Path) -> WidgetSession:
    """Load the module file, construct the module and its widget, and run ``setup()`` (what opening it does)."""
    module = load_module_file(module_file)
    module.MedGMAESlicer(module_parent(module_file))
    widget = module.MedGMAESlicerWidget(qMRMLWidget())  # the app gives the widget its panel, then calls setup()
    widget.setup()
    widget.parent.isEntered = True
    opened_widgets.append(widget)
    return WidgetSession(module, widget, _current_app)
