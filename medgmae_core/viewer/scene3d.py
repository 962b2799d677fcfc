"""The 3D view's VTK pipeline, without web code: the ellipsoid glyphs (coloured by intensity, the same polydata
and colour map as the demo's PNG and ``.mrb``), a translucent surface of the volume and its outline, rendered
offscreen (EGL) and picked server-side. The web page streams this render window (``trame-vtk`` remote view)."""
from __future__ import annotations

import os

import numpy as np

from ..export.glyphs import glyph_counts


class Scene3D:
    def __init__(self, size: tuple[int, int] = (520, 520)) -> None:
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
        import vtk  # lazy: optional dependency (the [viewer] extra; slicer-core brings VTK); after the window choice

        self.vtk = vtk
        self.renderer = vtk.vtkRenderer()
        self.renderer.SetBackground(0.08, 0.08, 0.1)
        self.window = vtk.vtkRenderWindow()
        self.window.SetOffScreenRendering(1)
        self.window.AddRenderer(self.renderer)
        self.window.SetSize(*size)
        self.interactor = vtk.vtkRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.window)
        self.interactor.GetInteractorStyle().SetCurrentStyleToTrackballCamera()
        self.interactor.EnableRenderOff()

        lut = vtk.vtkLookupTable()
        lut.SetHueRange(0.66, 0.0)  # blue (faint) -> red (bright), as export.figures.render_glyphs_offscreen
        lut.Build()
        self.glyph_mapper = vtk.vtkPolyDataMapper()
        self.glyph_mapper.SetLookupTable(lut)
        self.glyph_actor = vtk.vtkActor()
        self.glyph_actor.SetMapper(self.glyph_mapper)
        self.renderer.AddActor(self.glyph_actor)
        self.set_glyph_opacity(0.6)

        self.surface_mapper = vtk.vtkPolyDataMapper()
        self.surface_mapper.ScalarVisibilityOff()
        self.surface_actor = vtk.vtkActor()
        self.surface_actor.SetMapper(self.surface_mapper)
        self.surface_actor.GetProperty().SetColor(0.85, 0.85, 0.8)
        self.surface_actor.GetProperty().SetOpacity(0.25)
        self.surface_actor.PickableOff()
        self.renderer.AddActor(self.surface_actor)
        self.outline_mapper = vtk.vtkPolyDataMapper()
        self.outline_actor = vtk.vtkActor()
        self.outline_actor.SetMapper(self.outline_mapper)
        self.outline_actor.GetProperty().SetColor(0.6, 0.6, 0.6)
        self.outline_actor.PickableOff()
        self.renderer.AddActor(self.outline_actor)

        self.picker = vtk.vtkCellPicker()
        self.picker.SetTolerance(0.002)
        self.glyph_indices = np.zeros(0, dtype=np.int64)
        self.triangles_per_glyph = 1

    # ------------------------------------------------------------------ content
    def set_volume(self, volume, ijk_to_ras, level: float = 0.45) -> None:
        """Surface of the display volume ``[I, J, K]`` (windowed [0, 1]) at ``level``, in RAS, and its outline."""
        vtk = self.vtk
        from vtk.util import numpy_support as ns  # lazy: optional dependency (VTK), as in __init__

        arr = np.asarray(volume, dtype=np.float32)
        step = max(1, int(np.ceil(max(arr.shape) / 96)))  # a light surface: at most ~96 samples per axis
        arr = np.ascontiguousarray(arr[::step, ::step, ::step])
        img = vtk.vtkImageData()
        img.SetDimensions(*arr.shape)
        img.GetPointData().SetScalars(ns.numpy_to_vtk(arr.transpose(2, 1, 0).ravel(), deep=True))
        surface = vtk.vtkFlyingEdges3D()
        surface.SetInputData(img)
        surface.SetValue(0, float(level))
        outline = vtk.vtkOutlineFilter()
        outline.SetInputData(img)
        affine = np.asarray(ijk_to_ras, dtype=np.float64) @ np.diag([step, step, step, 1.0])
        transform = vtk.vtkTransform()
        transform.SetMatrix(affine.ravel().tolist())
        for source, mapper in ((surface, self.surface_mapper), (outline, self.outline_mapper)):
            tf = vtk.vtkTransformPolyDataFilter()
            tf.SetTransform(transform)
            tf.SetInputConnection(source.GetOutputPort())
            tf.Update()
            out = vtk.vtkPolyData()
            out.DeepCopy(tf.GetOutput())
            mapper.SetInputData(out)

    def set_glyphs(self, polydata, indices, scalar_range: tuple[float, float] | None = None) -> None:
        """Show glyph polydata (``ViewerSession.glyph_polydata``); ``indices[j]`` is glyph ``j``'s Gaussian."""
        self.glyph_indices = np.asarray(indices)
        self.triangles_per_glyph = glyph_counts()[1]
        mapper = self.glyph_mapper
        mapper.SetInputData(polydata)
        values = polydata.GetPointData().GetArray("intensity")
        if values is not None and values.GetNumberOfTuples():
            mapper.SetScalarModeToUsePointFieldData()
            mapper.SelectColorArray("intensity")
            mapper.ScalarVisibilityOn()
            lo, hi = scalar_range or values.GetRange()
            mapper.SetScalarRange(lo, max(hi, lo + 1e-6))
        else:
            mapper.ScalarVisibilityOff()

    def set_glyph_opacity(self, opacity: float) -> None:
        self.glyph_actor.GetProperty().SetOpacity(float(min(max(opacity, 0.05), 1.0)))

    def reset_camera(self) -> None:
        """Look from anterior, superior up (like the demo PNG's 3D panel), framing the volume (glyphs that reach
        past it are cut by the view's edge, not allowed to shrink the volume)."""
        data = self.outline_mapper.GetInput()
        camera = self.renderer.GetActiveCamera()
        if data is not None and data.GetNumberOfPoints():
            bounds = data.GetBounds()
            centre = np.array([(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2])
            camera.SetFocalPoint(*centre)
            camera.SetPosition(*(centre + np.array([0.0, 1000.0, 0.0])))
            camera.SetViewUp(0.0, 0.0, 1.0)
            self.renderer.ResetCamera(bounds)
        else:
            self.renderer.ResetCamera()
        self.renderer.ResetCameraClippingRange()

    # ------------------------------------------------------------------ picking
    def pick(self, x: float, y: float) -> int | None:
        """The Gaussian under display pixel ``(x, y)`` (VTK convention: origin bottom left), or None."""
        if not self.picker.Pick(float(x), float(y), 0.0, self.renderer):
            return None
        if self.picker.GetActor() is not self.glyph_actor:
            return None
        cell = self.picker.GetCellId()
        if cell < 0:
            return None
        j = cell // max(1, self.triangles_per_glyph)
        return int(self.glyph_indices[j]) if 0 <= j < len(self.glyph_indices) else None

    def display_position(self, point_ras) -> tuple[float, float]:
        """Display pixel ``(x, y)`` (origin bottom left) of a world point, for tests and for picking by point."""
        r = self.renderer
        r.SetWorldPoint(*[float(v) for v in point_ras], 1.0)
        r.WorldToDisplay()
        x, y, _ = r.GetDisplayPoint()
        return x, y

    def render(self) -> None:
        self.window.Render()

    def screenshot(self) -> np.ndarray:
        """RGB ``uint8 [H, W, 3]`` of the current view."""
        vtk = self.vtk
        from vtk.util import numpy_support as ns  # lazy: optional dependency (VTK), as in __init__

        self.window.Render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(self.window)
        grab.SetInputBufferTypeToRGB()
        grab.ReadFrontBufferOff()
        grab.Update()
        img = grab.GetOutput()
        w, h, _ = img.GetDimensions()
        return ns.vtk_to_numpy(img.GetPointData().GetScalars()).reshape(h, w, 3)[::-1].copy()


__all__ = ["Scene3D"]
