"""The module without the Slicer application: a real MRML scene from slicer-core, for batch scripts and tests.

Inside the app everything here defers to it (``slicer.mrmlScene``, ``slicer.util.loadVolume``,
``slicer.util.saveScene``, the layout's 3D view); under plain Python (``pip install slicer-core``) it builds the
scene the way trame-slicer does: application logic, colour nodes, volumes logic, optional slice views and an
offscreen 3D view.

Pictures (:meth:`Session.render_3d`): in Slicer they come from the main window's 3D view, so they need Slicer's main
window and therefore a display (Slicer's VTK has no EGL; on a server use ``xvfb-run``). Under plain Python VTK
renders offscreen with EGL only if ``VTK_DEFAULT_OPENGL_WINDOW=vtkEGLRenderWindow`` was set *before* VTK was
imported (``examples/slicer_batch_predict.py`` sets it first thing, before it imports this module, which imports
VTK through ``slicer``); setting it later has no effect.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

OFFSCREEN_HINT = ("3D pictures need a display, or EGL under plain Python: set VTK_DEFAULT_OPENGL_WINDOW="
                  "vtkEGLRenderWindow before Python imports VTK (the batch script does this when it starts without a "
                  "display), or run with a display (xvfb-run on a server)")


def in_slicer_app() -> bool:
    return hasattr(slicer, "app") and slicer.app is not None


@dataclass
class Session:
    scene: object
    app_logic: object = None
    volumes_logic: object = None

    # -------------------------------------------------------------- volumes
    def load_volume(self, path: str | Path, name: str | None = None):
        """A CT file (NIfTI, NRRD, ...) as a ``vtkMRMLScalarVolumeNode``; a clear error when it cannot be read."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"input CT {path} does not exist")
        if in_slicer_app():
            return slicer.util.loadVolume(str(path))
        node = self.volumes_logic.AddArchetypeVolume(str(path), name or _stem(path))
        if node is None or node.GetImageData() is None:
            raise ValueError(f"input CT {path}: not a volume slicer-core can read (NIfTI, NRRD, MHA)")
        return node

    # -------------------------------------------------------------- scene files
    def save_mrb(self, path: str | Path) -> Path:
        """Write the scene as a Slicer bundle (.mrb) that the real app opens."""
        path = Path(path)
        if path.suffix.lower() != ".mrb":
            raise ValueError(f"scene output {path} must end in .mrb")
        if not in_slicer_app():
            from medgmae_core.export.slicer_scene import write_mrb  # lazy: medgmae_core imports torch
            return write_mrb(self.scene, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not slicer.util.saveScene(str(path)) or not path.is_file():
            raise RuntimeError(f"could not write the scene bundle {path}")
        return path

    # -------------------------------------------------------------- views
    def add_slice_views(self) -> list:
        """Red/Yellow/Green slice and composite nodes (what the app's layout creates), so layers can be set."""
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(self.scene)
        composites = []
        for name, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
            slice_node = self.scene.AddNewNodeByClass("vtkMRMLSliceNode", name)
            slice_node.SetLayoutName(name)
            slice_node.SetOrientation(orientation)
            composite = self.scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
            composite.SetLayoutName(name)
            composites.append(composite)
        return composites

    def render_3d(self, png: str | Path | None = None, size: tuple[int, int] = (480, 480),
                  azimuth: float = 30.0, elevation: float = 20.0) -> np.ndarray:
        """Render the scene's models in a 3D view; returns ``[H, W, 3]`` uint8 and saves a PNG.

        In Slicer: the main window's first 3D view (needs the main window, so a display). Under plain Python: an
        offscreen render window (EGL when ``VTK_DEFAULT_OPENGL_WINDOW`` was set before VTK was imported, else the
        display)."""
        if in_slicer_app():
            return _render_app_3d_view(png)
        if not offscreen_possible():
            raise RuntimeError(OFFSCREEN_HINT)
        view = self.scene.GetFirstNodeByClass("vtkMRMLViewNode") or self.scene.AddNewNodeByClass("vtkMRMLViewNode", "View1")
        view.SetLayoutName(view.GetLayoutName() or "1")
        view.SetBoxVisible(False)
        view.SetAxisLabelsVisible(False)
        renderer, window = vtk.vtkRenderer(), vtk.vtkRenderWindow()
        window.SetOffScreenRendering(1)
        window.AddRenderer(renderer)
        window.SetSize(*size)
        interactor = vtk.vtkRenderWindowInteractor()  # displayable managers need one
        interactor.SetRenderWindow(window)
        factory = slicer.vtkMRMLThreeDViewDisplayableManagerFactory.GetInstance()
        factory.SetMRMLApplicationLogic(self.app_logic)
        for name in ("vtkMRMLCameraDisplayableManager", "vtkMRMLViewDisplayableManager", "vtkMRMLModelDisplayableManager"):
            if not factory.IsDisplayableManagerRegistered(name):
                factory.RegisterDisplayableManager(name)
        group = factory.InstantiateDisplayableManagers(renderer)
        group.SetMRMLDisplayableNode(view)
        renderer.ResetCamera()
        camera = renderer.GetActiveCamera()
        camera.Azimuth(azimuth)
        camera.Elevation(elevation)
        renderer.ResetCameraClippingRange()
        window.Render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(window)
        grab.ReadFrontBufferOff()
        grab.Update()
        image = grab.GetOutput()
        w, h, _ = image.GetDimensions()
        rgb = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)[::-1, :, :3].copy()
        if png is not None:
            writer = vtk.vtkPNGWriter()
            writer.SetFileName(str(png))
            writer.SetInputConnection(grab.GetOutputPort())
            writer.Write()
        group.SetMRMLDisplayableNode(None)
        window.Finalize()
        return rgb


def offscreen_possible(environ=None, platform: str | None = None) -> bool:
    """Whether plain-Python VTK can open a render window here: EGL was chosen before VTK loaded, or there is a
    display (always on Windows and macOS)."""
    environ = os.environ if environ is None else environ
    platform = platform or sys.platform
    if not platform.startswith("linux"):
        return True
    return bool(environ.get("VTK_DEFAULT_OPENGL_WINDOW") or environ.get("DISPLAY") or environ.get("WAYLAND_DISPLAY"))


def _render_app_3d_view(png) -> np.ndarray:
    """The first 3D view of Slicer's layout, as an image (qMRMLThreeDView.renderWindow + vtkWindowToImageFilter)."""
    layout = slicer.app.layoutManager()
    if layout is None:
        raise RuntimeError("--png needs Slicer's main window and a display: run Slicer without --no-main-window "
                           "(with xvfb-run on a server), or run the script with plain Python and slicer-core, which "
                           "renders offscreen with EGL")
    view = layout.threeDWidget(0).threeDView()
    view.resetFocalPoint()
    view.forceRender()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(view.renderWindow())
    grab.ReadFrontBufferOff()
    grab.Update()
    image = grab.GetOutput()
    w, h, _ = image.GetDimensions()
    rgb = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)[::-1, :, :3].copy()
    if png is not None:
        writer = vtk.vtkPNGWriter()
        writer.SetFileName(str(png))
        writer.SetInputConnection(grab.GetOutputPort())
        writer.Write()
    return rgb


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def create_session(*, set_global: bool = True) -> Session:
    """The app's scene inside Slicer; else a new slicer-core scene (``export.slicer_scene.new_scene``)."""
    if in_slicer_app():
        return Session(slicer.mrmlScene, slicer.app.applicationLogic(), slicer.modules.volumes.logic())
    from medgmae_core.export.slicer_scene import new_scene  # lazy: medgmae_core imports torch

    previous = getattr(slicer, "mrmlScene", None)
    hs = new_scene()  # sets slicer.mrmlScene, which slicer.util helpers use
    hs.app_logic.SetModuleLogic("Volumes", hs.volumes_logic)
    if not set_global:
        slicer.mrmlScene = previous
    return Session(hs.scene, hs.app_logic, hs.volumes_logic)


def load_mrb(path: str | Path):
    """Read a .mrb into a new scene (``export.slicer_scene.read_scene``); returns the scene."""
    from medgmae_core.export.slicer_scene import read_scene  # lazy: medgmae_core imports torch

    previous = getattr(slicer, "mrmlScene", None)
    hs = read_scene(path)
    slicer.mrmlScene = previous  # reading must not replace the scene a script works on
    _keep_alive.append(hs)
    return hs.scene


_keep_alive: list = []  # the logic objects of loaded scenes must outlive the scenes
