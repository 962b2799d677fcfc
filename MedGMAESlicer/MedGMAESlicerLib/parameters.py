"""The module's parameters, written once.

:class:`MedGMAEParameters` is a plain dataclass with typed, range-annotated fields (used by the logic, batch scripts
and tests; it reads and writes a ``vtkMRMLScriptedModuleNode`` exactly as Slicer's parameter node wrapper does).
:func:`parameter_node_wrapper_class` derives from the same field list the ``@parameterNodeWrapper`` class the real
Slicer app binds to the .ui through ``SlicerParameterName`` properties (``slicer.parameterNodeWrapper`` is not part of
slicer-core).

Choices are enums with readable labels: the wrapper's ``QComboBoxToEnumConnector`` shows ``EnumType.label(member)``
in the combo box and stores the member *name* (``EnumSerializer``), so users see "Whole volume", not "whole".
File and folder parameters are ``str`` (empty = not set), bound to ``ctkPathLineEdit`` by the small connector
registered here: a ``pathlib.Path`` parameter would show an empty field as "." (``str(Path()) == "."``).
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import typing
from dataclasses import dataclass
from typing import Annotated, Any

from .compat import translator

_ = translator()


@dataclass(frozen=True)
class Range:
    minimum: float
    maximum: float


@dataclass(frozen=True)
class Choice:
    choices: tuple


@dataclass(frozen=True)
class Node:
    """A MRML node reference of this class (``None`` when unset)."""
    class_name: str


@dataclass(frozen=True)
class PathField:
    """A file or folder path kept as ``str``; ``""`` means not set."""
    kind: str = "file"  # "file" or "dir"


class LabeledEnum(enum.Enum):
    """A choice whose combo box shows :meth:`label`; the member value is the token the logic and CLI use."""

    def label(self) -> str:
        return _LABELS[type(self)][self]

    @classmethod
    def parse(cls, value) -> "LabeledEnum":
        """A member from itself, its value (``"whole"``) or its name (``"WHOLE"``, what the scene stores)."""
        if isinstance(value, cls):
            return value
        text = str(value)
        for member in cls:
            if value == member.value or text in (str(member.value), member.name):
                return member
        raise ValueError(f"{value!r} is not one of {[m.value for m in cls]}")


class WindowMode(LabeledEnum):
    POINT = "point"
    WHOLE = "whole"


class Device(LabeledEnum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class TrainCommand(LabeledEnum):
    PRETRAIN = "pretrain"
    FINETUNE = "finetune"


class ModelSize(LabeledEnum):
    TINY = "tiny"
    BASE = "base"
    LARGE = "large"


class ReconSource(LabeledEnum):
    SIMULATE = "simulate"
    PROJECTIONS = "projections"


class Geometry(LabeledEnum):
    PARALLEL = "parallel"
    CONE = "cone"


class ReconInit(LabeledEnum):
    MEDGMAE = "medgmae"
    FBP = "fbp"


class GlyphScale(LabeledEnum):
    """Ellipsoid radius in standard deviations."""
    ONE = 1
    TWO = 2
    THREE = 3


_LABELS: dict = {
    WindowMode: {WindowMode.POINT: _("One window around the point"), WindowMode.WHOLE: _("Whole volume")},
    Device: {Device.AUTO: _("Automatic (GPU when available)"), Device.CPU: _("CPU"), Device.CUDA: _("GPU (CUDA)")},
    TrainCommand: {TrainCommand.PRETRAIN: _("Pre-train MedGMAE (self-supervised)"),
                   TrainCommand.FINETUNE: _("Fine-tune segmentation (UNETR)")},
    ModelSize: {ModelSize.TINY: _("Tiny (runs on a CPU)"), ModelSize.BASE: _("Base"), ModelSize.LARGE: _("Large (GPU)")},
    ReconSource: {ReconSource.SIMULATE: _("Simulate a scan of the input CT"),
                  ReconSource.PROJECTIONS: _("Measured projections from a file")},
    Geometry: {Geometry.PARALLEL: _("Parallel beam"), Geometry.CONE: _("Cone beam")},
    ReconInit: {ReconInit.MEDGMAE: _("MedGMAE (zero-shot from a checkpoint)"),
                ReconInit.FBP: _("FBP heuristic (3DGR-CT)")},
    GlyphScale: {GlyphScale.ONE: _("1 standard deviation"), GlyphScale.TWO: _("2 standard deviations"),
                 GlyphScale.THREE: _("3 standard deviations")},
}


def _checked(name: str, value: Any, spec: tuple[type, Any]) -> Any:
    """One parameter's value coerced to its type and checked against its range / choices / node class."""
    kind, marker = spec
    if isinstance(marker, Node):
        if value is not None and not value.IsA(marker.class_name):
            raise ValueError(f"parameter {name}: expected a {marker.class_name}, got {value.GetClassName()}")
        return value
    try:
        if isinstance(kind, type) and issubclass(kind, LabeledEnum):
            value = kind.parse(value)
        elif isinstance(marker, PathField):
            value = path_text(value)
        elif kind is bool:
            value = value if isinstance(value, bool) else _parse_bool(value)
        else:
            value = kind(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"parameter {name}: {value!r} is not a valid {kind.__name__}: {exc}") from exc
    if isinstance(marker, Range) and not marker.minimum <= value <= marker.maximum:
        raise ValueError(f"parameter {name}: {value} is outside [{marker.minimum}, {marker.maximum}]")
    if isinstance(marker, Choice) and value not in marker.choices:
        raise ValueError(f"parameter {name}: {value!r} is not one of {list(marker.choices)}")
    return value


@dataclass
class MedGMAEParameters:
    # Mask
    inputVolume: Annotated[Any, Node("vtkMRMLScalarVolumeNode")] = None
    maskRatio: Annotated[float, Range(0.0, 0.95)] = 0.75
    patchSize: Annotated[int, Range(2, 64)] = 12
    seed: Annotated[int, Range(0, 2**31 - 1)] = 0
    # Predict
    checkpointPath: Annotated[str, PathField("file")] = ""  # empty: the bundled demo weights
    windowMode: WindowMode = WindowMode.POINT
    windowPoint: Annotated[Any, Node("vtkMRMLMarkupsFiducialNode")] = None
    predictFromMasked: bool = True
    device: Device = Device.AUTO
    glyphOpacity: Annotated[float, Range(0.0, 1.0)] = 0.6
    glyphResolution: Annotated[int, Range(4, 32)] = 8
    intensityThreshold: Annotated[float, Range(0.0, 1.0)] = 0.1  # fraction of the strongest Gaussian
    glyphSigma: GlyphScale = GlyphScale.TWO
    predictionOpacity: Annotated[float, Range(0.0, 1.0)] = 0.4
    exportDirectory: Annotated[str, PathField("dir")] = ""
    # Train
    trainCommand: TrainCommand = TrainCommand.PRETRAIN
    finetuneEncoderPath: Annotated[str, PathField("file")] = ""  # fine-tuning only; empty: from scratch
    trainDataFolder: Annotated[str, PathField("dir")] = ""
    trainConfig: ModelSize = ModelSize.TINY
    trainSteps: Annotated[int, Range(1, 10_000_000)] = 1000
    trainOutputFolder: Annotated[str, PathField("dir")] = ""
    trainResume: bool = False
    trainDevice: Device = Device.AUTO
    # Reconstruct
    reconSource: ReconSource = ReconSource.SIMULATE
    projectionsPath: Annotated[str, PathField("file")] = ""
    reconGeometry: Geometry = Geometry.PARALLEL
    reconViews: Annotated[int, Range(4, 1440)] = 60
    reconInit: ReconInit = ReconInit.MEDGMAE
    reconCheckpointPath: Annotated[str, PathField("file")] = ""  # empty: the bundled demo weights
    reconDevice: Device = Device.AUTO
    reconIterations: Annotated[int, Range(1, 1_000_000)] = 1500  # the CLI default: the measured +4 dB setting
    reconOutputFolder: Annotated[str, PathField("dir")] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "MedGMAEParameters":
        """Coerce types and check ranges/choices; errors name the parameter."""
        for name, spec in field_specs().items():
            object.__setattr__(self, name, _checked(name, getattr(self, name), spec))
        return self

    @classmethod
    def check(cls, **values: Any) -> dict[str, Any]:
        """Check only the given parameters (e.g. a command builder's arguments), without building a whole
        parameter set: the coerced values; errors name the parameter."""
        specs = field_specs()
        unknown = sorted(set(values) - set(specs))
        if unknown:
            raise ValueError(f"unknown parameters {unknown}")
        return {name: _checked(name, value, specs[name]) for name, value in values.items()}

    # ------------------------------------------------ parameter node (scene) I/O
    def write_to_node(self, node) -> None:
        """Store in a ``vtkMRMLScriptedModuleNode`` as the parameter node wrapper's serializers do
        (Base/Python/slicer/parameterNodeWrapper/serializers.py): numbers and strings as ``str``, bools as
        ``"True"``/``"False"``, enums by member name, nodes as a node reference (plus an empty parameter)."""
        was = node.StartModify()
        for name, (kind, marker) in field_specs().items():
            node.SetParameter(name, serialize(getattr(self, name), kind, marker))
            if isinstance(marker, Node):
                value = getattr(self, name)
                node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
        node.EndModify(was)

    @classmethod
    def read_from_node(cls, node) -> "MedGMAEParameters":
        values = {}
        for name, (kind, marker) in field_specs().items():
            if isinstance(marker, Node):
                values[name] = node.GetNodeReference(name)
            elif node.HasParameter(name):
                values[name] = node.GetParameter(name)
        return cls(**values)


def serialize(value, kind, marker) -> str:
    """The text the parameter node wrapper stores for a value."""
    if isinstance(marker, Node):
        return ""
    if isinstance(value, enum.Enum):
        return value.name
    if kind is bool:
        return "True" if value else "False"
    return str(value)


def path_text(value) -> str:
    """A path parameter as text; ``None``, ``""`` and ``Path()`` (which prints as ".") are all "not set"."""
    if value is None:
        return ""
    text = str(value)
    return "" if text == "." else text


def choice_value(choice):
    """A choice parameter's token (``Device.CPU`` -> ``"cpu"``), what command lines and requests take; plain values
    pass through."""
    return getattr(choice, "value", choice)


def is_set(path) -> bool:
    """A path parameter that was filled in."""
    return path_text(path) != ""


def _parse_bool(value: Any) -> bool:
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{value!r} is not a boolean")


@functools.lru_cache(maxsize=None)
def field_specs() -> dict[str, tuple[type, Any]]:
    """name -> (python type, Range | Choice | Node | PathField | None), in declaration order."""
    hints = typing.get_type_hints(MedGMAEParameters, include_extras=True)
    specs = {}
    for f in dataclasses.fields(MedGMAEParameters):
        hint = hints[f.name]
        if typing.get_origin(hint) is Annotated:
            kind, *extras = typing.get_args(hint)
            specs[f.name] = (kind, extras[0])
        else:
            specs[f.name] = (hint, None)
    return specs


def path_parameters() -> list[str]:
    return [name for name, (_kind, marker) in field_specs().items() if isinstance(marker, PathField)]


# ----------------------------------------------------------------------------- the app's wrapper
_connector_registered = False


def register_path_connector() -> None:
    """Bind ``str`` parameters to ``ctkPathLineEdit`` (the wrapper's own connector binds only ``pathlib`` types).

    Written against ``GuiConnector`` in Base/Python/slicer/parameterNodeWrapper/guiConnectors.py: the same
    ``currentPathChanged`` signal and ``currentPath`` property as its ``ctkPathLineEditToPathConnector``, but the
    text is kept as it is, so an empty field stays empty.
    """
    global _connector_registered
    if _connector_registered:
        return
    # lazy: ctk and slicer.parameterNodeWrapper exist only in the application; this file also loads in the
    # prediction worker and in plain Python
    import ctk
    from slicer.parameterNodeWrapper import GuiConnector, parameterNodeGuiConnector, unannotatedType

    @parameterNodeGuiConnector
    class CtkPathLineEditToStrConnector(GuiConnector):
        @staticmethod
        def canRepresent(widget, datatype) -> bool:
            return type(widget) == ctk.ctkPathLineEdit and unannotatedType(datatype) == str

        @staticmethod
        def create(widget, datatype):
            return CtkPathLineEditToStrConnector(widget) if CtkPathLineEditToStrConnector.canRepresent(
                widget, datatype) else None

        def __init__(self, widget):
            super().__init__()
            self._widget = widget

        def _connect(self):
            self._widget.currentPathChanged.connect(self.changed)

        def _disconnect(self):
            self._widget.currentPathChanged.disconnect(self.changed)

        def widget(self):
            return self._widget

        def read(self):
            return str(self._widget.currentPath)

        def write(self, value) -> None:
            self._widget.currentPath = str(value)

    _connector_registered = True


@functools.lru_cache(maxsize=None)
def parameter_node_wrapper_class():
    """``@parameterNodeWrapper`` class with the same fields, for the Slicer app (needs ``slicer.parameterNodeWrapper``)."""
    # lazy: slicer.parameterNodeWrapper exists only in the application (see register_path_connector)
    import slicer
    from slicer.parameterNodeWrapper import Choice as SlicerChoice
    from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper

    register_path_connector()
    annotations, defaults = {}, {}
    for f in dataclasses.fields(MedGMAEParameters):
        kind, marker = field_specs()[f.name]
        if isinstance(marker, Node):
            annotations[f.name] = getattr(slicer, marker.class_name)  # default: no node
            continue
        if isinstance(marker, Range):
            annotations[f.name] = Annotated[kind, WithinRange(marker.minimum, marker.maximum)]
        elif isinstance(marker, Choice):
            annotations[f.name] = Annotated[kind, SlicerChoice(list(marker.choices))]
        else:
            annotations[f.name] = kind  # enums, bool, and str paths (PathField is ours only)
        defaults[f.name] = f.default
    namespace = {"__annotations__": annotations, "__module__": __name__, **defaults,
                 "__doc__": "MedGMAESlicer parameter node (fields from MedGMAEParameters)."}
    return parameterNodeWrapper(type("MedGMAESlicerParameterNode", (), namespace))


def parameters_from_wrapper(wrapper) -> MedGMAEParameters:
    """Snapshot a parameter-node wrapper (or anything with the same attributes) as plain parameters."""
    return MedGMAEParameters(**{name: getattr(wrapper, name) for name in field_specs()})
