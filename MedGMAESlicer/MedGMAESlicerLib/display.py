"""The module logic's display part: results into the MRML scene, and back out of it.

:class:`DisplayLogic` (``MedGMAELogic.display``) turns arrays into nodes and nodes into files: the masked CT and its
label map, the rendered prediction as the foreground layer, the ellipsoid glyph model and the table of Gaussian
parameters, the window centre from a point list (markups), PLY / NIfTI export of what is shown, the CT a simulated
scan starts from, and the results of a reconstruction run (volume, PSNR table and plot chart). It keeps what it shows
(the last mask, prediction and reconstruction) and reuses those nodes on re-runs. It computes nothing itself:
coordinates come from ``medgmae_core.spatial``, glyph polydata from ``medgmae_core.export.glyphs``, node creation
from ``medgmae_core.export.slicer_scene``, files from ``medgmae_core.export``. It works on any MRML scene: the app's,
or a slicer-core one (tests, batch scripts).

Array order: ``slicer.util.arrayFromVolume`` gives ``[K, J, I]``; ``medgmae_core`` indexes volumes ``[i, j, k]``
with the node's IJKToRAS as affine, so arrays are transposed on the way in and out.

``medgmae_core`` imports torch, so it is imported inside the functions that use it: the module loads (and says what
is missing) in a Slicer that has not installed the dependencies yet.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import slicer
import vtk

from .compat import translator
from .parameters import MedGMAEParameters, choice_value, is_set
from .prediction import MaskedVolume, PredictionOutput

_ = translator()
log = logging.getLogger(__name__)

MASK_LABEL = 1  # label value of hidden patches


# ----------------------------------------------------------------------------- MRML helpers
def ijk_to_ras(volume_node) -> np.ndarray:
    """The volume's 4x4 IJKToRAS matrix."""
    from medgmae_core.export.slicer_scene import node_ijk_to_ras  # lazy: medgmae_core imports torch
    return node_ijk_to_ras(volume_node)


def array_ijk(volume_node) -> np.ndarray:
    """Voxels as ``[I, J, K]`` (a view of the node's ``[K, J, I]`` array)."""
    if volume_node is None or volume_node.GetImageData() is None:
        raise ValueError("input volume: no volume selected, or the volume has no image data")
    return slicer.util.arrayFromVolume(volume_node).transpose(2, 1, 0)


def add_volume(scene, array_ijk_: np.ndarray, affine: np.ndarray, name: str, *, labelmap: bool = False,
               node=None, parent_transform_id: str | None = None, window_level: tuple[float, float] | None = None):
    """A volume node from an ``[I, J, K]`` array and its IJKToRAS: new (``export.slicer_scene.add_volume_node``)
    or ``node`` updated in place when it is still in the scene (re-runs reuse their nodes)."""
    from medgmae_core.export.slicer_scene import add_volume_node  # lazy: medgmae_core imports torch

    if node is None or node.GetScene() is None:
        node = add_volume_node(scene, array_ijk_, affine, scene.GenerateUniqueName(name), labelmap=labelmap,
                               window_level=window_level)
    else:
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(np.asarray(affine, dtype=np.float64)))
        data = np.asarray(array_ijk_, dtype=np.uint8 if labelmap else np.float32)
        slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(data.transpose(2, 1, 0)))
    node.SetAndObserveTransformNodeID(parent_transform_id)
    return node


def slice_composites(scene) -> list:
    """The scene's slice composite nodes (one per slice view)."""
    return [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]


def _in_app_scene(scene) -> bool:
    return getattr(slicer, "app", None) is not None and scene is getattr(slicer, "mrmlScene", None)


def set_slice_layers(scene, *, background=None, foreground=None, label=None, foreground_opacity: float | None = None,
                     label_opacity: float | None = None, fit: bool = False) -> int:
    """Show volumes in every slice view of the scene; returns the number of views (slice composite nodes).

    In the app this is ``slicer.util.setSliceViewerLayers(..., fit=fit)``, which also fits the views to the new
    layers; on a headless slicer-core scene (no layout manager, nothing to fit) the composite nodes are set
    directly, the way that function does.
    """
    composites = slice_composites(scene)
    if _in_app_scene(scene):
        keep = "keep-current"
        slicer.util.setSliceViewerLayers(
            background=background if background is not None else keep,
            foreground=foreground if foreground is not None else keep,
            label=label if label is not None else keep, foregroundOpacity=foreground_opacity,
            labelOpacity=label_opacity, fit=fit)
        return len(composites)
    for comp in composites:
        if background is not None:
            comp.SetBackgroundVolumeID(background.GetID())
        if foreground is not None:
            comp.SetForegroundVolumeID(foreground.GetID())
        if label is not None:
            comp.SetLabelVolumeID(label.GetID())
        if foreground_opacity is not None:
            comp.SetForegroundOpacity(float(foreground_opacity))
        if label_opacity is not None:
            comp.SetLabelOpacity(float(label_opacity))
    return len(composites)


def newest_point_ras(points, volume_node=None) -> list[float] | None:
    """The *newest* control point of a markups point list, in ``volume_node``'s RAS (through its parent transform);
    None when the list is missing or empty."""
    if points is None or points.GetNumberOfControlPoints() == 0:
        return None
    point = [0.0, 0.0, 0.0]
    points.GetNthControlPointPositionWorld(points.GetNumberOfControlPoints() - 1, point)
    if volume_node is not None and volume_node.GetParentTransformNode() is not None:
        to_local = vtk.vtkGeneralTransform()
        volume_node.GetParentTransformNode().GetTransformFromWorld(to_local)
        point = list(to_local.TransformPoint(point))
    return point


def _show_chart(chart) -> None:
    """Show a plot chart in the app's plot view (no-op headless: slicer-core has no ``slicer.modules``)."""
    try:
        slicer.modules.plots.logic().ShowChartInLayout(chart)
    except AttributeError:
        pass


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "volume"


# ----------------------------------------------------------------------------- what is shown
@dataclass
class Timings:
    values: dict[str, float] = field(default_factory=dict)

    def text(self) -> str:
        return ", ".join(f"{k} {v:.2f} s" for k, v in self.values.items())


@dataclass
class GlyphSettings:
    opacity: float = 0.6
    resolution: int = 8
    threshold: float = 0.1  # fraction of the strongest Gaussian's intensity (robust to the model's intensity scale)
    sigma: int = 2

    @classmethod
    def from_parameters(cls, params: MedGMAEParameters) -> "GlyphSettings":
        return cls(params.glyphOpacity, params.glyphResolution, params.intensityThreshold,
                   int(choice_value(params.glyphSigma)))

    def geometry(self) -> tuple:
        """What needs the glyph polydata rebuilt (opacity does not)."""
        return self.resolution, self.threshold, self.sigma


@dataclass
class MaskPreview:
    masked_node: object
    label_node: object
    mask: np.ndarray  # [I, J, K] uint8, 1 = hidden
    fill_value: float

    @property
    def hidden_fraction(self) -> float:
        return float(self.mask.mean())


@dataclass
class Prediction:
    """A prediction shown in the scene: world-space Gaussians and the nodes that show them."""
    volume_node: object
    centres_ras: np.ndarray  # [n, 3] mm
    axes_ras: np.ndarray  # [n, 3, 3] columns = 1-sigma axes in mm
    intensities: np.ndarray  # [n]
    mode: str = "point"
    checkpoint: str = ""
    timings: Timings = field(default_factory=Timings)
    glyph: GlyphSettings = field(default_factory=GlyphSettings)
    glyph_key: tuple | None = None
    shown: int = 0
    model_node: object = None
    prediction_node: object = None
    table_node: object = None
    gaussians: object = None  # GaussianSet in normalised coords of the prepared grid
    grid_shape: tuple | None = None
    grid_affine: np.ndarray | None = None
    windows: int = 1
    prediction_opacity: float = 0.4

    def intensity_cut(self) -> float:
        """The absolute intensity the threshold (a fraction of the strongest Gaussian) corresponds to."""
        top = float(self.intensities.max()) if len(self.intensities) else 0.0
        return self.glyph.threshold * top


@dataclass
class ReconstructionResult:
    volume_node: object
    psnr_table: object
    chart: object
    metrics: dict


# ----------------------------------------------------------------------------- the display part
class DisplayLogic:
    """Results into the scene and out of it (``MedGMAELogic.display``). ``scene`` defaults to ``slicer.mrmlScene``
    (the app's, or the one a script set), looked up at each use."""

    def __init__(self, scene=None) -> None:
        self._scene = scene
        self.last_mask: MaskPreview | None = None
        self.last_prediction: Prediction | None = None
        self.last_reconstruction: ReconstructionResult | None = None

    @property
    def scene(self):
        return self._scene if self._scene is not None else slicer.mrmlScene

    def reset(self) -> None:
        """Forget what is shown (the scene is closing)."""
        self.last_mask = self.last_prediction = self.last_reconstruction = None

    # ------------------------------------------------------------------ mask
    def show_mask(self, volume_node, masked: MaskedVolume, *, show: bool = True) -> MaskPreview:
        """``<CT> masked`` (with the CT's window/level) and the label map ``<CT> mask``, shown as background and
        label layers when ``show``; a new mask of the same CT updates the same nodes."""
        affine = ijk_to_ras(volume_node)
        name, transform_id = volume_node.GetName(), volume_node.GetTransformNodeID()
        reuse = self.last_mask if self.last_mask and self.last_mask.masked_node.GetScene() is self.scene else None
        masked_node = add_volume(self.scene, masked.masked, affine, f"{name} masked",
                                 node=reuse.masked_node if reuse else None, parent_transform_id=transform_id)
        label_node = add_volume(self.scene, masked.mask * MASK_LABEL, affine, f"{name} mask", labelmap=True,
                                node=reuse.label_node if reuse else None, parent_transform_id=transform_id)
        if masked_node.GetDisplayNode() and volume_node.GetDisplayNode():
            source = volume_node.GetDisplayNode()
            masked_node.GetDisplayNode().SetAutoWindowLevel(False)
            masked_node.GetDisplayNode().SetWindowLevel(source.GetWindow(), source.GetLevel())
        if show:
            set_slice_layers(self.scene, background=masked_node, label=label_node, label_opacity=0.35, fit=True)
        self.last_mask = MaskPreview(masked_node, label_node, masked.mask, masked.fill_value)
        return self.last_mask

    # ------------------------------------------------------------------ prediction
    def show_prediction(self, volume_node, output: PredictionOutput, *, glyph: GlyphSettings | None = None,
                        prediction_opacity: float = 0.4) -> Prediction:
        """Turn a :class:`PredictionOutput` into nodes: ellipsoid glyph model in RAS, rendered prediction as the
        foreground layer (fitted in the slice views), a table of the Gaussian parameters. Re-runs on the same CT
        reuse their nodes."""
        from medgmae_core import spatial  # lazy: medgmae_core imports torch
        from medgmae_core.data.transforms import HU_WINDOW  # lazy: medgmae_core imports torch

        if volume_node is None or volume_node.GetScene() is not self.scene:
            raise ValueError(_("the CT this prediction was made for is no longer in the scene"))
        t0 = time.perf_counter()
        gaussians = output.gaussians()
        centres_ras, axes_ras = spatial.gaussians_to_world(gaussians, output.grid_shape, output.grid_affine)
        intensities = gaussians.intensities.detach().reshape(-1).cpu().double().numpy()
        prediction = Prediction(volume_node, centres_ras, axes_ras, intensities, mode=output.mode,
                                checkpoint=output.checkpoint, timings=Timings(dict(output.timings)),
                                gaussians=gaussians, grid_shape=tuple(output.grid_shape),
                                grid_affine=np.asarray(output.grid_affine), windows=output.windows)
        lo, hi = HU_WINDOW
        name = volume_node.GetName()
        old = self.last_prediction if self.last_prediction and self.last_prediction.volume_node is volume_node else None
        prediction.prediction_node = add_volume(self.scene, lo + output.pred * (hi - lo), output.pred_affine,
                                                f"{name} MedGMAE prediction",
                                                node=old.prediction_node if old else None,
                                                parent_transform_id=volume_node.GetTransformNodeID())
        display = prediction.prediction_node.GetDisplayNode()
        if display is not None:
            display.SetAutoWindowLevel(False)
            display.SetWindowLevelMinMax(lo, hi)
        prediction.glyph = glyph or GlyphSettings()
        prediction.model_node = old.model_node if old else None
        self.update_glyphs(prediction, force=True)
        prediction.table_node = self.update_table(prediction, old.table_node if old else None)
        prediction.prediction_opacity = float(prediction_opacity)
        set_slice_layers(self.scene, background=volume_node, foreground=prediction.prediction_node,
                         foreground_opacity=prediction_opacity, fit=True)
        prediction.timings.values["show"] = round(time.perf_counter() - t0, 3)
        self.last_prediction = prediction
        log.info("MedGMAE prediction for %s (%s): %s", name, output.checkpoint, prediction.timings.text())
        return prediction

    def update_glyphs(self, prediction: Prediction, force: bool = False) -> None:
        """(Re)build the glyph polydata when resolution, threshold or sigma changed (or ``force``); opacity always."""
        from medgmae_core.export import glyphs  # lazy: medgmae_core imports torch
        from medgmae_core.export.slicer_scene import add_glyph_model_node  # lazy: medgmae_core imports torch

        s = prediction.glyph
        key = s.geometry()
        if force or key != prediction.glyph_key:
            t0 = time.perf_counter()
            poly = glyphs.gaussian_glyph_polydata(prediction.centres_ras, prediction.axes_ras, prediction.intensities,
                                                  sigma=s.sigma, resolution=s.resolution,
                                                  threshold=prediction.intensity_cut())
            node = prediction.model_node
            values = prediction.intensities
            full_range = (float(values.min()), float(values.max()) + 1e-6) if len(values) else None
            if node is None or node.GetScene() is None:
                node = add_glyph_model_node(  # coloured by intensity over all Gaussians, outlines in slice views
                    self.scene, poly, self.scene.GenerateUniqueName(f"{prediction.volume_node.GetName()} Gaussians"),
                    scalar_range=full_range)
                node.SetAndObserveTransformNodeID(prediction.volume_node.GetTransformNodeID())
                prediction.model_node = node
            else:
                node.SetAndObservePolyData(poly)
                if full_range is not None:
                    node.GetDisplayNode().SetScalarRange(*full_range)
            prediction.glyph_key = key
            prediction.shown = int(np.sum(prediction.intensities >= prediction.intensity_cut()))
            prediction.timings.values["glyphs"] = time.perf_counter() - t0
        prediction.model_node.GetDisplayNode().SetOpacity(float(s.opacity))

    def update_table(self, prediction: Prediction, node=None):
        """The table of Gaussian parameters (centre R/A/S mm, principal scales mm, quaternion, intensity): ``node``
        refilled when it is still in the scene, else a new ``<CT> Gaussian parameters`` table node."""
        from medgmae_core import spatial  # lazy: medgmae_core imports torch

        scales, quats = spatial.world_axes_to_scales_quaternions(prediction.axes_ras)
        c = prediction.centres_ras
        columns = {"index": np.arange(len(c), dtype=np.int32), "R (mm)": c[:, 0], "A (mm)": c[:, 1], "S (mm)": c[:, 2],
                   "scale 1 (mm)": scales[:, 0], "scale 2 (mm)": scales[:, 1], "scale 3 (mm)": scales[:, 2],
                   "qw": quats[:, 0], "qx": quats[:, 1], "qy": quats[:, 2], "qz": quats[:, 3],
                   "intensity": prediction.intensities}
        if node is None or node.GetScene() is None:
            node = self.scene.AddNewNodeByClass("vtkMRMLTableNode", self.scene.GenerateUniqueName(
                f"{prediction.volume_node.GetName()} Gaussian parameters"))
        slicer.util.updateTableFromArray(node, [np.ascontiguousarray(v) for v in columns.values()], list(columns))
        return node

    def update_display(self, *, opacity: float | None = None, resolution: int | None = None,
                       threshold: float | None = None, sigma: int | None = None,
                       prediction_opacity: float | None = None) -> None:
        """Glyph opacity, resolution, intensity threshold, scale (sigma) and the overlay's opacity."""
        prediction = self.last_prediction
        if prediction is None:
            raise ValueError("no prediction to display yet: run Predict first")
        s = prediction.glyph
        prediction.glyph = GlyphSettings(
            opacity=s.opacity if opacity is None else opacity, resolution=s.resolution if resolution is None else resolution,
            threshold=s.threshold if threshold is None else threshold, sigma=s.sigma if sigma is None else sigma)
        self.update_glyphs(prediction)
        if prediction_opacity is not None and float(prediction_opacity) != prediction.prediction_opacity:
            # only the slice views that show this prediction; the user's other views keep their opacity
            for comp in slice_composites(self.scene):
                if prediction.prediction_node is not None and \
                        comp.GetForegroundVolumeID() == prediction.prediction_node.GetID():
                    comp.SetForegroundOpacity(float(prediction_opacity))
            prediction.prediction_opacity = float(prediction_opacity)

    def status_text(self) -> str:
        """What the last prediction shows, in words (the timings are in the log)."""
        p = self.last_prediction
        if p is None:
            return _("No prediction yet.")
        where = _("one model window around the chosen point") if p.mode == "point" else \
            _("the whole volume ({count} overlapping windows)").format(count=p.windows)
        return _("{n} Gaussians predicted over {where}. {shown} are drawn as ellipsoids at {sigma} standard "
                 "deviations (those at least {threshold:.0%} as bright as the brightest); the rendered prediction "
                 "is shown over the CT.").format(n=len(p.intensities), where=where, shown=p.shown, sigma=p.glyph.sigma,
                                                 threshold=p.glyph.threshold)

    # ------------------------------------------------------------------ export
    def require_prediction(self) -> Prediction:
        if self.last_prediction is None:
            raise ValueError("nothing to export yet: run Predict first")
        return self.last_prediction

    def export_path(self, directory, suffix: str) -> Path:
        """``<directory>/<CT name><suffix>`` for the shown prediction (the folder is created)."""
        if not is_set(directory):
            raise ValueError("export folder: choose a folder to write to")
        name = _safe_name(self.require_prediction().volume_node.GetName())
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        return directory / f"{name}{suffix}"

    def export_ply(self, path: str | Path) -> Path:
        """The predicted Gaussians as a 3DGS-style PLY in RAS millimetres (``medgmae_core.export.ply``)."""
        from medgmae_core.export.ply import write_gaussians_ply  # lazy: medgmae_core imports torch
        p = self.require_prediction()
        return write_gaussians_ply(path, p.gaussians, shape=p.grid_shape, ijk_to_ras=p.grid_affine)

    def export_nifti(self, path: str | Path, *, mask_path: str | Path | None = None) -> list[Path]:
        """The rendered prediction (and the last mask preview) as NIfTI (``medgmae_core.export.nifti``)."""
        from medgmae_core.export.nifti import write_volume  # lazy: medgmae_core imports torch
        p = self.require_prediction()
        written = [write_volume(path, array_ijk(p.prediction_node), ijk_to_ras(p.prediction_node), kind="prediction")]
        if mask_path is not None and self.last_mask is not None:
            written.append(write_volume(mask_path, self.last_mask.mask, ijk_to_ras(self.last_mask.label_node),
                                        kind="mask"))
        return written

    # ------------------------------------------------------------------ reconstruction
    def write_input_ct(self, volume_node, path: str | Path) -> Path:
        """The CT a scan is simulated from, as NIfTI for the ``medgmae reconstruct`` process."""
        from medgmae_core.export.nifti import write_volume  # lazy: medgmae_core imports torch
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return write_volume(path, array_ijk(volume_node), ijk_to_ras(volume_node), kind="prediction")

    def load_reconstruction_result(self, result_or_folder) -> str:
        """Show a finished reconstruction (a ``JobResult`` or its output folder): the volume (HU when known) and the
        PSNR curve (table + plot chart); returns the sentence that says so."""
        from medgmae_core.export.nifti import read_volume_array  # lazy: medgmae_core imports torch

        folder = Path(result_or_folder.outputs().get("out", "") if hasattr(result_or_folder, "outputs")
                      else result_or_folder)
        volume_path = next((folder / n for n in ("reconstruction_hu.nii.gz", "reconstruction.nii.gz")
                            if (folder / n).is_file()), None)
        if volume_path is None:
            raise FileNotFoundError(f"no reconstruction.nii.gz in {folder}")
        array, affine = read_volume_array(volume_path)
        node = add_volume(self.scene, array, affine, f"MedGMAE reconstruction ({folder.name})")
        metrics = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else {}
        history = [h for h in metrics.get("history", []) if "psnr" in h]
        self.last_reconstruction = ReconstructionResult(node, None, None, metrics)
        if history:
            self.last_reconstruction.psnr_table, self.last_reconstruction.chart = self._psnr_chart(history)
        set_slice_layers(self.scene, background=node, fit=True)
        final = _(" Its PSNR against the reference is {psnr:.2f} dB.").format(psnr=metrics["psnr"]) \
            if isinstance(metrics.get("psnr"), (int, float)) else ""
        return _("The reconstruction is shown in the slice views ({file} from {folder}).").format(
            file=volume_path.name, folder=folder) + final

    def _psnr_chart(self, history: list[dict]):
        """A table node (iteration, PSNR) and a plot chart of it, shown in the app's plot view."""
        table = self.scene.AddNewNodeByClass("vtkMRMLTableNode", self.scene.GenerateUniqueName("MedGMAE PSNR"))
        slicer.util.updateTableFromArray(
            table, [np.array([h["iteration"] for h in history], dtype=np.float64),
                    np.array([float(h["psnr"]) for h in history], dtype=np.float64)], ["iteration", "PSNR (dB)"])
        series = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", "PSNR")
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName("iteration")
        series.SetYColumnName("PSNR (dB)")
        series.SetPlotType(series.PlotTypeScatter)
        chart = self.scene.AddNewNodeByClass("vtkMRMLPlotChartNode", self.scene.GenerateUniqueName("MedGMAE PSNR curve"))
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
        chart.SetXAxisTitle("iteration")
        chart.SetYAxisTitle("PSNR (dB)")
        _show_chart(chart)
        return table, chart
