"""The module's parameters, written once.

:class:`MedGMAEParameters` is a plain dataclass with typed, range-annotated fields (used by the logic,
batch scripts and tests, and able to save to / load from a ``vtkMRMLScriptedModuleNode``).
:func:`parameter_node_wrapper_class` derives from the same field list the ``@parameterNodeWrapper``
class the real Slicer app binds to the .ui through ``SlicerParameterName`` properties
(``slicer.parameterNodeWrapper`` is not part of slicer-core).
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any


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


@dataclass
class MedGMAEParameters:
    # Mask
    inputVolume: Annotated[Any, Node("vtkMRMLScalarVolumeNode")] = None
    maskRatio: Annotated[float, Range(0.0, 0.95)] = 0.75
    patchSize: Annotated[int, Range(2, 64)] = 12
    seed: Annotated[int, Range(0, 2**31 - 1)] = 0
    # Predict
    checkpointPath: Path = Path()  # empty: the bundled demo weights
    windowMode: Annotated[str, Choice(("point", "whole"))] = "point"
    windowPoint: Annotated[Any, Node("vtkMRMLMarkupsFiducialNode")] = None
    predictFromMasked: bool = True
    device: Annotated[str, Choice(("auto", "cpu", "cuda"))] = "auto"
    glyphOpacity: Annotated[float, Range(0.0, 1.0)] = 0.6
    glyphResolution: Annotated[int, Range(4, 32)] = 8
    intensityThreshold: Annotated[float, Range(0.0, 1.0)] = 0.1  # fraction of the strongest Gaussian
    glyphSigma: Annotated[int, Choice((1, 2, 3))] = 2
    predictionOpacity: Annotated[float, Range(0.0, 1.0)] = 0.4
    exportDirectory: Path = Path()
    # Train
    trainCommand: Annotated[str, Choice(("pretrain", "finetune"))] = "pretrain"
    trainDataFolder: Path = Path()
    trainConfig: Annotated[str, Choice(("tiny", "base", "large"))] = "tiny"
    trainSteps: Annotated[int, Range(1, 10_000_000)] = 1000
    trainOutputFolder: Path = Path()
    trainResume: bool = False
    trainDevice: Annotated[str, Choice(("auto", "cpu", "cuda"))] = "auto"
    # Reconstruct
    reconSource: Annotated[str, Choice(("simulate", "projections"))] = "simulate"
    projectionsPath: Path = Path()
    reconGeometry: Annotated[str, Choice(("parallel", "cone"))] = "parallel"
    reconViews: Annotated[int, Range(4, 1440)] = 60
    reconInit: Annotated[str, Choice(("medgmae", "fbp"))] = "medgmae"
    reconIterations: Annotated[int, Range(1, 1_000_000)] = 300
    reconOutputFolder: Path = Path()

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "MedGMAEParameters":
        """Coerce types and check ranges/choices; errors name the parameter."""
        for name, (kind, marker) in field_specs().items():
            value = getattr(self, name)
            if isinstance(marker, Node):
                if value is not None and not value.IsA(marker.class_name):
                    raise ValueError(f"parameter {name}: expected a {marker.class_name}, got {value.GetClassName()}")
                continue
            try:
                value = kind(value) if kind is not bool or isinstance(value, bool) else _parse_bool(value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"parameter {name}: {value!r} is not a valid {kind.__name__}") from exc
            if isinstance(marker, Range) and not marker.minimum <= value <= marker.maximum:
                raise ValueError(f"parameter {name}: {value} is outside [{marker.minimum}, {marker.maximum}]")
            if isinstance(marker, Choice) and value not in marker.choices:
                raise ValueError(f"parameter {name}: {value!r} is not one of {list(marker.choices)}")
            object.__setattr__(self, name, value)
        return self

    # ------------------------------------------------ parameter node (scene) I/O
    def write_to_node(self, node) -> None:
        """Store in a ``vtkMRMLScriptedModuleNode`` the way Slicer's parameter node wrapper does."""
        was = node.StartModify()
        for name, (kind, marker) in field_specs().items():
            value = getattr(self, name)
            if isinstance(marker, Node):
                node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            else:
                node.SetParameter(name, str(value))
        node.EndModify(was)

    @classmethod
    def read_from_node(cls, node) -> "MedGMAEParameters":
        values = {}
        for name, (kind, marker) in field_specs().items():
            if isinstance(marker, Node):
                values[name] = node.GetNodeReference(name)
            elif node.GetParameter(name):
                text = node.GetParameter(name)
                values[name] = _parse_bool(text) if kind is bool else kind(text)
        return cls(**values)


def is_set(path) -> bool:
    """A path parameter that was filled in (an empty path widget reads back as ``Path('.')``)."""
    return path is not None and str(path) not in ("", ".")


def _parse_bool(value: Any) -> bool:
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{value!r} is not a boolean")


@functools.lru_cache(maxsize=None)
def field_specs() -> dict[str, tuple[type, Any]]:
    """name -> (python type, Range | Choice | Node | None), in declaration order."""
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


@functools.lru_cache(maxsize=None)
def parameter_node_wrapper_class():
    """``@parameterNodeWrapper`` class with the same fields, for the Slicer app (needs ``slicer.parameterNodeWrapper``)."""
    import slicer
    from slicer.parameterNodeWrapper import Choice as SlicerChoice
    from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper

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
            annotations[f.name] = kind
        defaults[f.name] = f.default
    namespace = {"__annotations__": annotations, "__module__": __name__, **defaults,
                 "__doc__": "MedGMAESlicer parameter node (fields from MedGMAEParameters)."}
    return parameterNodeWrapper(type("MedGMAESlicerParameterNode", (), namespace))


def parameters_from_wrapper(wrapper) -> MedGMAEParameters:
    """Snapshot a parameter-node wrapper (or anything with the same attributes) as plain parameters."""
    return MedGMAEParameters(**{name: getattr(wrapper, name) for name in field_specs()})
