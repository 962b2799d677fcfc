"""Slicer scenes (.mrb) built headless with slicer-core: CT, mask label map, prediction and glyph model.

Follows the headless recipe (scene + ``vtkSlicerApplicationLogic`` + default colour nodes + volumes logic;
``slicer.mrmlScene`` set for ``slicer.util``). Arrays are ``[I, J, K]`` with an IJK->RAS affine, as everywhere in
the project; VTK image data is x-fastest, i.e. the array transposed to ``[K, J, I]``. slicer-core is imported
lazily here only. Reading back (tests, batch checks): unzip the bundle and ``scene.Import()``.
"""
from __future__ import annotations

import glob
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import spatial

INTENSITY_COLOR_NODE = "vtkMRMLColorTableNodeIron"
LABEL_COLOR_NODE = "vtkMRMLColorTableNodeLabels"
CT_WINDOW_LEVEL = (400.0, 40.0)  # abdominal soft-tissue window (HU)
SLICE_VIEWS = ("Red", "Yellow", "Green")


def _slicer():
    try:  # lazy: optional dependency (slicer-core)
        import slicer
        import vtk
        from vtk.util import numpy_support
    except ImportError as exc:  # pragma: no cover - optional dependency
        raise ImportError("Slicer scenes need slicer-core: pip install 'medgmae-core[slicer]'") from exc
    return slicer, vtk, numpy_support


@dataclass
class HeadlessScene:
    """A MRML scene with the logic objects it needs alive (they must outlive the scene's use)."""

    scene: object
    app_logic: object
    volumes_logic: object


def new_scene() -> HeadlessScene:
    slicer, _, _ = _slicer()
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    colors = app_logic.GetColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    app_logic.SetModuleLogic("Colors", colors)
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLScene(scene)
    volumes.SetMRMLApplicationLogic(app_logic)
    slicer.mrmlScene = scene
    return HeadlessScene(scene, app_logic, volumes)


def _matrix(affine):
    _, vtk, _ = _slicer()
    m = vtk.vtkMatrix4x4()
    for i in range(4):
        for j in range(4):
            m.SetElement(i, j, float(affine[i, j]))
    return m


def node_ijk_to_ras(node) -> np.ndarray:
    _, vtk, _ = _slicer()
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


def volume_array(node) -> np.ndarray:
    """``[I, J, K]`` numpy copy of a volume node's voxels."""
    _, _, ns = _slicer()
    img = node.GetImageData()
    if img is None:
        raise ValueError(f"volume node {node.GetName()!r} has no image data")
    dims = img.GetDimensions()
    return ns.vtk_to_numpy(img.GetPointData().GetScalars()).reshape(dims[::-1]).transpose(2, 1, 0).copy()


def add_volume_node(scene, array, ijk_to_ras, name: str, *, labelmap: bool = False,
                    window_level: tuple[float, float] | None = None):
    """Add a scalar (or label map) volume node from ``array [I, J, K]`` and its affine; returns the node."""
    _, vtk, ns = _slicer()
    arr = array.detach().cpu().numpy() if hasattr(array, "detach") else np.asarray(array)
    if arr.ndim != 3:
        raise ValueError(f"volume {name!r} must be 3D [I, J, K], got shape {arr.shape}")
    arr = arr.astype(np.uint8 if labelmap else np.float32)
    affine = spatial.check_affine(ijk_to_ras, f"{name} ijk_to_ras")
    image = vtk.vtkImageData()
    image.SetDimensions(*arr.shape)
    image.GetPointData().SetScalars(ns.numpy_to_vtk(np.ascontiguousarray(arr.transpose(2, 1, 0)).ravel(), deep=True))
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode", name)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(_matrix(affine))
    node.CreateDefaultDisplayNodes()
    node.AddDefaultStorageNode()
    display = node.GetDisplayNode()
    if labelmap:
        display.SetAndObserveColorNodeID(LABEL_COLOR_NODE)
    elif window_level is not None:
        display.AutoWindowLevelOff()
        display.SetWindowLevel(*window_level)
    return node


def add_glyph_model_node(scene, polydata, name: str = "MedGMAE Gaussians", *, scalar_name: str = "intensity",
                         scalar_range: tuple[float, float] | None = None, opacity: float = 1.0):
    """Add a model node for glyph polydata (RAS): coloured by ``scalar_name``, outlines shown in slice views."""
    _, _, ns = _slicer()
    node = scene.AddNewNodeByClass("vtkMRMLModelNode", name)
    node.SetAndObservePolyData(polydata)
    node.CreateDefaultDisplayNodes()
    node.AddDefaultStorageNode()
    display = node.GetDisplayNode()
    display.SetOpacity(float(opacity))
    display.SetVisibility2D(True)  # outlines (slice intersections) in the slice views
    display.SetSliceIntersectionThickness(2)
    scalars = polydata.GetPointData().GetArray(scalar_name)
    if scalars is not None:
        display.SetActiveScalarName(scalar_name)
        display.SetActiveAttributeLocation(0)  # point data
        display.SetAndObserveColorNodeID(INTENSITY_COLOR_NODE)
        display.SetScalarVisibility(True)
        if scalar_range is None and scalars.GetNumberOfTuples():
            values = ns.vtk_to_numpy(scalars)
            scalar_range = (float(values.min()), float(values.max()) + 1e-6)
        if scalar_range is not None:
            display.SetScalarRangeFlag(display.UseManualScalarRange)
            display.SetScalarRange(*scalar_range)
    return node


def set_slice_layers(scene, background=None, foreground=None, label=None, foreground_opacity: float = 0.4) -> None:
    """Slice composite nodes (Red/Yellow/Green) showing CT / prediction / mask when the scene is opened."""
    slicer, _, _ = _slicer()
    for view in SLICE_VIEWS:
        comp = slicer.vtkMRMLSliceCompositeNode()
        comp.SetLayoutName(view)
        comp.SetSingletonTag(view)
        comp = scene.AddNode(comp)
        comp.SetBackgroundVolumeID(background.GetID() if background else None)
        comp.SetForegroundVolumeID(foreground.GetID() if foreground else None)
        comp.SetLabelVolumeID(label.GetID() if label else None)
        comp.SetForegroundOpacity(float(foreground_opacity))


def write_scene(path: str | Path, *, ct=None, mask=None, prediction=None, glyphs=None,
                names: dict[str, str] | None = None) -> Path:
    """Write a .mrb with any of: ``ct`` / ``prediction`` ``(array, ijk_to_ras)`` (HU), ``mask`` ``(array, ijk_to_ras)``
    label map, ``glyphs`` vtkPolyData (RAS, with an ``intensity`` point array)."""
    path = Path(path)
    if path.suffix.lower() != ".mrb":
        raise ValueError(f"Slicer scene bundle path must end in .mrb, got {path}")
    names = {"ct": "CT", "mask": "MedGMAE mask", "prediction": "MedGMAE prediction",
             "glyphs": "MedGMAE Gaussians", **(names or {})}
    hs = new_scene()
    scene = hs.scene
    ct_node = add_volume_node(scene, *ct, names["ct"], window_level=CT_WINDOW_LEVEL) if ct is not None else None
    pred_node = (add_volume_node(scene, *prediction, names["prediction"], window_level=CT_WINDOW_LEVEL)
                 if prediction is not None else None)
    mask_node = add_volume_node(scene, *mask, names["mask"], labelmap=True) if mask is not None else None
    if glyphs is not None:
        add_glyph_model_node(scene, glyphs, names["glyphs"])
    set_slice_layers(scene, ct_node or pred_node, pred_node if ct_node else None, mask_node)
    return write_mrb(scene, path)


def write_mrb(scene, path: str | Path) -> Path:
    """Write ``scene`` as a Slicer bundle atomically (temp file + rename); returns the absolute path.

    slicer-core's ``WriteToMRB`` fails on relative paths, so the path is resolved first.
    """
    path = Path(path).expanduser().resolve()
    if path.suffix.lower() != ".mrb":
        raise ValueError(f"Slicer scene bundle path must end in .mrb, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.mrb")
    if not scene.WriteToMRB(str(tmp)) or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"slicer-core could not write the scene bundle {path}")
    tmp.replace(path)
    return path


def read_scene(path: str | Path) -> HeadlessScene:
    """Load a .mrb into a fresh headless scene (unzip + ``scene.Import()``); nodes keep their data."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Slicer scene bundle not found: {path}")
    hs = new_scene()
    with tempfile.TemporaryDirectory(prefix="medgmae_mrb_") as tmp:
        try:
            zipfile.ZipFile(path).extractall(tmp)
        except zipfile.BadZipFile:
            raise ValueError(f"{path} is not a Slicer .mrb bundle (not a zip file)") from None
        mrml = sorted(glob.glob(str(Path(tmp) / "**" / "*.mrml"), recursive=True))
        if not mrml:
            raise ValueError(f"{path} holds no .mrml scene file")
        hs.scene.SetURL(mrml[0])
        if not hs.scene.Import():
            raise ValueError(f"slicer-core could not import the scene in {path}")
    return hs


__all__ = ["HeadlessScene", "new_scene", "add_volume_node", "add_glyph_model_node", "set_slice_layers", "write_mrb",
           "write_scene", "read_scene", "volume_array", "node_ijk_to_ras", "INTENSITY_COLOR_NODE"]
