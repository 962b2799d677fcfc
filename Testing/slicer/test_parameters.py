"""Parameters: one field list, a plain dataclass with range checks, scene round trip, and the derived wrapper."""
from __future__ import annotations

import sys
import types
import typing
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedGMAESlicer"))

from MedGMAESlicerLib import parameters as P  # noqa: E402


def test_defaults_and_validation():
    p = P.MedGMAEParameters()
    assert p.maskRatio == 0.75 and p.patchSize == 12 and p.glyphSigma is P.GlyphScale.TWO and p.windowMode is P.WindowMode.POINT
    assert p.checkpointPath == "" and p.exportDirectory == ""  # empty paths are empty, not "."
    with pytest.raises(ValueError, match="parameter maskRatio: 1.5 is outside"):
        P.MedGMAEParameters(maskRatio=1.5)
    with pytest.raises(ValueError, match="parameter device: 'tpu' is not a valid Device"):
        P.MedGMAEParameters(device="tpu")
    # choices by member, token or stored name; paths from str or Path, Path() being "not set"
    assert P.MedGMAEParameters(windowMode="whole", device="CUDA").windowMode is P.WindowMode.WHOLE
    assert P.MedGMAEParameters(device="CUDA").device is P.Device.CUDA
    assert P.MedGMAEParameters(checkpointPath=Path()).checkpointPath == ""
    assert P.MedGMAEParameters(checkpointPath=Path("/w/c.pt")).checkpointPath == "/w/c.pt"
    assert not P.is_set(".") and not P.is_set(None) and P.is_set("/w")
    with pytest.raises(ValueError, match="parameter glyphSigma"):
        P.MedGMAEParameters(glyphSigma=4)
    with pytest.raises(ValueError, match="parameter trainSteps: 'many' is not a valid int"):
        P.MedGMAEParameters(trainSteps="many")
    assert P.MedGMAEParameters(patchSize="16", trainResume="true").patchSize == 16



def test_check_only_the_given_parameters():
    """Command builders check their arguments without building (and discarding) a whole parameter set."""
    assert P.MedGMAEParameters.check(trainSteps="7", trainConfig="base") == {"trainSteps": 7,
                                                                              "trainConfig": P.ModelSize.BASE}
    with pytest.raises(ValueError, match="parameter maskRatio"):
        P.MedGMAEParameters.check(maskRatio=1.5)
    with pytest.raises(ValueError, match="unknown parameters"):
        P.MedGMAEParameters.check(maskRatioo=0.5)


def test_node_fields_check_class():
    import slicer
    scene = slicer.vtkMRMLScene()
    table = scene.AddNewNodeByClass("vtkMRMLTableNode")
    with pytest.raises(ValueError, match="parameter inputVolume: expected a vtkMRMLScalarVolumeNode"):
        P.MedGMAEParameters(inputVolume=table)
    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")  # a subclass of scalar volume: accepted
    assert P.MedGMAEParameters(inputVolume=label).inputVolume is label


def test_round_trip_through_parameter_node_and_mrb(tmp_path):
    import slicer
    scene = slicer.vtkMRMLScene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    point = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "centre")
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "MedGMAESlicer")
    p = P.MedGMAEParameters(inputVolume=volume, windowPoint=point, maskRatio=0.6, seed=7, glyphSigma=3,
                            checkpointPath=Path("/w/ckpt.pt"), trainResume=True, reconInit="fbp")
    p.write_to_node(node)
    assert node.GetParameter("maskRatio") == "0.6" and node.GetNodeReferenceID("inputVolume") == volume.GetID()
    # as the wrapper's serializers store them: enums by name, bools as True/False, empty paths empty
    assert node.GetParameter("reconInit") == "FBP" and node.GetParameter("trainResume") == "True"
    assert node.GetParameter("exportDirectory") == "" and node.GetParameter("checkpointPath") == "/w/ckpt.pt"
    back = P.MedGMAEParameters.read_from_node(node)
    assert back == p
    # and through a saved scene
    path = str(tmp_path / "params.mrml")
    scene.SetURL(path)
    assert scene.Commit(path)
    scene2 = slicer.vtkMRMLScene()
    scene2.SetURL(path)
    scene2.Import()
    node2 = scene2.GetFirstNodeByName("MedGMAESlicer")
    back2 = P.MedGMAEParameters.read_from_node(node2)
    assert back2.inputVolume.GetName() == "ct" and back2.windowPoint.GetName() == "centre"
    assert (back2.maskRatio, back2.seed, back2.glyphSigma, back2.checkpointPath, back2.trainResume, back2.reconInit) == \
        (0.6, 7, P.GlyphScale.THREE, "/w/ckpt.pt", True, P.ReconInit.FBP)


def test_wrapper_class_is_derived_from_the_same_fields(monkeypatch):
    """Slicer's decorator reads ``typing.get_type_hints(cls, include_extras=True)`` and class defaults; a fake
    with the same contract checks what the app would receive."""
    import slicer

    class WithinRange:
        def __init__(self, lo, hi):
            self.minimum, self.maximum = lo, hi

    class Choice:
        def __init__(self, choices):
            self.choices = choices

    def parameterNodeWrapper(cls):
        cls.hints = typing.get_type_hints(cls, include_extras=True)
        return cls

    fake = types.ModuleType("slicer.parameterNodeWrapper")
    fake.WithinRange, fake.Choice, fake.parameterNodeWrapper = WithinRange, Choice, parameterNodeWrapper
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", fake)
    monkeypatch.setattr(P, "register_path_connector", lambda: None)  # tested with the full stand-in below
    P.parameter_node_wrapper_class.cache_clear()  # cached per process; this test's fake must not leak
    try:
        cls = P.parameter_node_wrapper_class()
    finally:
        P.parameter_node_wrapper_class.cache_clear()
    assert list(cls.hints) == list(P.field_specs())
    assert cls.hints["inputVolume"] is slicer.vtkMRMLScalarVolumeNode and not hasattr(cls, "inputVolume")
    ratio_type, ratio_range = typing.get_args(cls.hints["maskRatio"])
    assert ratio_type is float and (ratio_range.minimum, ratio_range.maximum) == (0.0, 0.95)
    seed_type, seed_range = typing.get_args(cls.hints["seed"])
    assert seed_type is int and (seed_range.minimum, seed_range.maximum) == (0, 2**31 - 1)
    assert cls.hints["glyphSigma"] is P.GlyphScale and cls.glyphSigma is P.GlyphScale.TWO
    assert cls.hints["checkpointPath"] is str and cls.checkpointPath == "" and cls.trainSteps == 1000
    assert cls.hints["windowMode"] is P.WindowMode and cls.windowMode is P.WindowMode.POINT
    # what the panel reads back from a wrapper instance is validated plain parameters
    inst = types.SimpleNamespace(**{n: f.default for n, f in P.MedGMAEParameters.__dataclass_fields__.items()})
    inst.seed = 5
    assert P.parameters_from_wrapper(inst).seed == 5


@pytest.fixture()
def standin(monkeypatch):
    """The parameter node wrapper stand-in (mirrors Base/Python/slicer/parameterNodeWrapper) and Qt widgets."""
    import slicer_app_standin
    slicer_app_standin.install(monkeypatch)
    monkeypatch.setattr(P, "_connector_registered", False)
    P.parameter_node_wrapper_class.cache_clear()
    yield slicer_app_standin
    P.parameter_node_wrapper_class.cache_clear()


def test_empty_paths_show_empty_and_choices_show_labels(standin):
    """Bound like the app binds them: an empty path field stays empty (a ``pathlib.Path`` parameter would show
    "."), and combo boxes show words, not tokens, while the node stores the member names."""
    import slicer

    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "MedGMAESlicer")
    wrapper = P.parameter_node_wrapper_class()(node)
    path_edit, combo, device = standin.ctkPathLineEdit(), standin.QComboBox(), standin.QComboBox()
    for widget, name in ((path_edit, "checkpointPath"), (combo, "windowMode"), (device, "reconDevice")):
        widget.setProperty("SlicerParameterName", name)
    gui = types.SimpleNamespace(a=path_edit, b=combo, c=device)
    wrapper.connectGui(gui)
    assert path_edit.currentPath == "" and wrapper.checkpointPath == ""
    assert combo.items == ["One window around the point", "Whole volume"] and combo.currentIndex == 0
    assert device.items == ["Automatic (GPU when available)", "CPU", "GPU (CUDA)"]
    combo.currentIndex = 1  # the user picks "Whole volume"
    assert wrapper.windowMode is P.WindowMode.WHOLE and node.GetParameter("windowMode") == "WHOLE"
    path_edit.currentPath = "/w/c.pt"
    assert wrapper.checkpointPath == "/w/c.pt" and P.parameters_from_wrapper(wrapper).checkpointPath == "/w/c.pt"
    path_edit.currentPath = ""
    assert wrapper.checkpointPath == "" and node.GetParameter("checkpointPath") == ""
    wrapper.reconDevice = P.Device.CPU  # and back: parameter -> widget
    assert device.currentIndex == 1

    # what a pathlib.Path parameter would do (why the paths are str): the empty field turns into "."
    pnw = sys.modules["slicer.parameterNodeWrapper"]

    @pnw.parameterNodeWrapper
    class WithPath:
        folder: Path

    bad = standin.ctkPathLineEdit()
    bad.setProperty("SlicerParameterName", "folder")
    WithPath(scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")).connectGui(types.SimpleNamespace(w=bad))
    assert bad.currentPath == "."
