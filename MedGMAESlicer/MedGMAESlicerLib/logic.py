"""The module's logic: plain Python over MRML nodes, callable headless (slicer-core) and from the app.

Every panel action is a method here with an ``interactive=False`` path (no dialogs, blocking jobs), so batch
scripts and tests drive the same code as the buttons. The numerical work is ``medgmae_core``'s: masking
(``model.vit.random_masking``), inference (``medgmae_core.inference`` through :mod:`.prediction`), coordinates
(``medgmae_core.spatial``), glyphs (``medgmae_core.export.glyphs``), PLY / NIfTI writers (``medgmae_core.export``).
This file only moves arrays in and out of MRML nodes. The panel predicts in a background process
(:meth:`MedGMAELogic.start_prediction`); scripts predict in-process (:meth:`MedGMAELogic.predict`); both run
:func:`.prediction.run_prediction` and show the result with :meth:`MedGMAELogic.show_prediction`.

Status messages are sentences for the person at the panel; timings go to the log.

Array order: ``slicer.util.arrayFromVolume`` gives ``[K, J, I]``; ``medgmae_core`` indexes volumes ``[i, j, k]``
with the node's IJKToRAS as affine, so arrays are transposed on the way in and out.
"""
from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .background import BackgroundLogic
from .compat import translator
from .jobs import BackgroundJob, JobResult
from .parameters import MedGMAEParameters, is_set
from .prediction import (PredictionCancelled, PredictionOutput, PredictionRequest, default_checkpoint,
                         load_gaussian_model, run_prediction)

_ = translator()
log = logging.getLogger(__name__)

MASK_LABEL = 1  # label value of hidden patches
__all__ = ["MedGMAELogic", "PredictionCancelled", "Prediction", "GlyphSettings", "default_checkpoint"]


# ----------------------------------------------------------------------------- MRML helpers
def _slicer():
    import slicer
    return slicer


def ijk_to_ras(volume_node) -> np.ndarray:
    """The volume's 4x4 IJKToRAS matrix."""
    from medgmae_core.export.slicer_scene import node_ijk_to_ras
    return node_ijk_to_ras(volume_node)


def array_ijk(volume_node) -> np.ndarray:
    """Voxels as ``[I, J, K]`` (a view of the node's ``[K, J, I]`` array)."""
    if volume_node is None or volume_node.GetImageData() is None:
        raise ValueError("input volume: no volume selected, or the volume has no image data")
    return _slicer().util.arrayFromVolume(volume_node).transpose(2, 1, 0)


def add_volume(scene, array_ijk_: np.ndarray, affine: np.ndarray, name: str, *, labelmap: bool = False,
               node=None, parent_transform_id: str | None = None, window_level: tuple[float, float] | None = None):
    """A volume node from an ``[I, J, K]`` array and its IJKToRAS: new (``export.slicer_scene.add_volume_node``)
    or ``node`` updated in place when it is still in the scene (re-runs reuse their nodes)."""
    from medgmae_core.export.slicer_scene import add_volume_node

    slicer = _slicer()
    if node is None or node.GetScene() is None:
        node = add_volume_node(scene, array_ijk_, affine, scene.GenerateUniqueName(name), labelmap=labelmap,
                               window_level=window_level)
    else:
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(np.asarray(affine, dtype=np.float64)))
        data = np.asarray(array_ijk_, dtype=np.uint8 if labelmap else np.float32)
        slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(data.transpose(2, 1, 0)))
    node.SetAndObserveTransformNodeID(parent_transform_id)
    return node


def _composites(scene) -> list:
    return [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]


def _in_app_scene(scene) -> bool:
    slicer = _slicer()
    return getattr(slicer, "app", None) is not None and scene is getattr(slicer, "mrmlScene", None)


def set_slice_layers(scene, *, background=None, foreground=None, label=None, foreground_opacity: float | None = None,
                     label_opacity: float | None = None, fit: bool = False) -> int:
    """Show volumes in every slice view of the scene; returns the number of views (slice composite nodes).

    In the app this is ``slicer.util.setSliceViewerLayers(..., fit=fit)``, which also fits the views to the new
    layers; on a headless slicer-core scene (no layout manager, nothing to fit) the composite nodes are set
    directly, the way that function does.
    """
    composites = _composites(scene)
    if _in_app_scene(scene):
        keep = "keep-current"
        _slicer().util.setSliceViewerLayers(
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


# ----------------------------------------------------------------------------- masking
def patch_mask(shape_ijk, patch_size: int, mask_ratio: float, seed: int) -> np.ndarray:
    """Random patch mask over a volume, 1 = hidden, as ``[ceil(I/p), ceil(J/p), ceil(K/p)]`` uint8.

    The same MAE masking the model uses (``medgmae_core.model.vit.random_masking``, argsort of uniform noise),
    seeded, so a seed gives the same mask here and in prediction.
    """
    import torch
    from medgmae_core.model.vit import random_masking

    if int(patch_size) < 1:
        raise ValueError(f"patch size must be >= 1 voxel, got {patch_size}")
    grid = tuple(-(-int(n) // int(patch_size)) for n in shape_ijk)
    generator = torch.Generator().manual_seed(int(seed))
    tokens = torch.zeros(1, int(np.prod(grid)), 1)
    _, mask, _ = random_masking(tokens, float(mask_ratio), generator)
    return mask.reshape(grid).to(torch.uint8).numpy()


def voxel_mask(shape_ijk, patch_mask_: np.ndarray, patch_size: int) -> np.ndarray:
    """Patch grid mask -> voxel mask of ``shape_ijk`` (cropped at the volume edge)."""
    p = int(patch_size)
    full = patch_mask_.repeat(p, 0).repeat(p, 1).repeat(p, 2)
    return np.ascontiguousarray(full[: shape_ijk[0], : shape_ijk[1], : shape_ijk[2]])


@dataclass
class MaskPreview:
    masked_node: object
    label_node: object
    mask: np.ndarray  # [I, J, K] uint8, 1 = hidden
    fill_value: float

    @property
    def hidden_fraction(self) -> float:
        return float(self.mask.mean())


# ----------------------------------------------------------------------------- the logic
@dataclass
class Timings:
    values: dict[str, float] = field(default_factory=dict)

    def __call__(self, name: str):
        timings = self

        class _Timer:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timings.values[name] = time.perf_counter() - self.t0

        return _Timer()

    def text(self) -> str:
        return ", ".join(f"{k} {v:.2f} s" for k, v in self.values.items())


class MedGMAELogic(BackgroundLogic):
    """All panel actions. ``scene`` defaults to ``slicer.mrmlScene`` (the app's, or the one a script set)."""

    def __init__(self, scene=None, *, log_callback: Callable[[str], None] | None = None) -> None:
        self._scene = scene
        self.log_callback = log_callback or log.info
        self.last_mask: MaskPreview | None = None
        self.last_prediction: Prediction | None = None
        self.last_reconstruction: ReconstructionResult | None = None
        self.last_message = ""
        self._model = self._model_config = self._model_key = self._model_path = None

    def reset(self) -> None:
        """Forget results (the scene is closing); the loaded model stays cached."""
        self.last_mask = self.last_prediction = self.last_reconstruction = None
        self.last_message = ""

    def say(self, message: str) -> str:
        """Record a status message (shown in the panel) and log it."""
        self.last_message = message
        self.log_callback(message)
        return message

    @property
    def scene(self):
        return self._scene if self._scene is not None else _slicer().mrmlScene

    # ------------------------------------------------------------------ mask
    def preview_mask(self, volume_node, *, mask_ratio: float = 0.75, patch_size: int = 12, seed: int = 0,
                     show: bool = True, interactive: bool = False) -> MaskPreview:
        """A masked copy of ``volume_node`` (hidden patches set to the volume minimum) and a label map of the mask."""
        MedGMAEParameters.check(maskRatio=mask_ratio, patchSize=patch_size, seed=seed)  # range checks, named errors
        voxels = array_ijk(volume_node)
        mask = voxel_mask(voxels.shape, patch_mask(voxels.shape, patch_size, mask_ratio, seed), patch_size)
        fill = float(voxels.min())
        masked = np.where(mask.astype(bool), np.asarray(fill, dtype=voxels.dtype), voxels)
        affine = ijk_to_ras(volume_node)
        name = volume_node.GetName()
        reuse = self.last_mask if self.last_mask and self.last_mask.masked_node.GetScene() is self.scene else None
        masked_node = add_volume(self.scene, masked, affine, f"{name} masked",
                                 node=reuse.masked_node if reuse else None,
                                 parent_transform_id=volume_node.GetTransformNodeID())
        label_node = add_volume(self.scene, mask * MASK_LABEL, affine, f"{name} mask",
                                labelmap=True, node=reuse.label_node if reuse else None,
                                parent_transform_id=volume_node.GetTransformNodeID())
        if masked_node.GetDisplayNode() and volume_node.GetDisplayNode():
            source = volume_node.GetDisplayNode()
            masked_node.GetDisplayNode().SetAutoWindowLevel(False)
            masked_node.GetDisplayNode().SetWindowLevel(source.GetWindow(), source.GetLevel())
        if show:
            set_slice_layers(self.scene, background=masked_node, label=label_node, label_opacity=0.35, fit=True)
        self.last_mask = MaskPreview(masked_node, label_node, mask, fill)
        self.say(_("Masked {fraction:.0%} of {name} in cubes of {size} voxels (random seed {seed}). The masked copy is "
                   "shown with the hidden cubes in the label layer.").format(
                       fraction=float(mask.mean()), name=name, size=patch_size, seed=seed))
        return self.last_mask

    def preview_mask_from_parameters(self, params: MedGMAEParameters, *, interactive: bool = False) -> MaskPreview:
        return self.preview_mask(params.inputVolume, mask_ratio=params.maskRatio, patch_size=params.patchSize,
                                 seed=params.seed, interactive=interactive)

    # ------------------------------------------------------------------ predict
    def load_model(self, checkpoint: str | Path | None, device: str = "auto"):
        """``(model, config)`` through ``medgmae_core.train.checkpoint.load_model``; cached per file and device."""
        from .prediction import checkpoint_path, resolve_device

        path = checkpoint_path(checkpoint)
        key = (str(path.resolve()), path.stat().st_mtime, resolve_device(device))
        if self._model_key != key:
            self._model, self._model_config, self._model_path = load_gaussian_model(path, key[2])
            self._model_key = key
        return self._model, self._model_config

    def prediction_request(self, volume_node, *, checkpoint=None, mode: str = "point", point_ras=None,
                           mask_ratio: float = 0.0, seed: int = 0, device: str = "auto") -> PredictionRequest:
        """The CT and settings as a :class:`PredictionRequest` (no node in it: it can go to another process)."""
        mode, device = getattr(mode, "value", mode), getattr(device, "value", device)
        MedGMAEParameters.check(maskRatio=mask_ratio, seed=seed, device=device, windowMode=mode)  # named errors
        return PredictionRequest(np.array(array_ijk(volume_node), dtype=np.float32), ijk_to_ras(volume_node),
                                 checkpoint="" if not is_set(checkpoint) else str(checkpoint), mode=mode,
                                 point_ras=point_ras, mask_ratio=mask_ratio, seed=seed, device=device)

    def predict(self, volume_node, *, checkpoint: str | Path | None = None, mode: str = "point",
                point_ras=None, mask_ratio: float = 0.0, seed: int = 0, device: str = "auto",
                glyph: GlyphSettings | None = None, prediction_opacity: float = 0.4, model=None,
                progress: Callable[[float, str], bool | None] | None = None, interactive: bool = False) -> "Prediction":
        """Predict in this process and show the result (scripts and tests; the panel uses :meth:`start_prediction`).

        One model window around ``point_ras`` (``mode="point"``; default: the volume centre) or the whole volume
        (``mode="whole"``, sliding windows). ``model`` (an already loaded model) replaces ``checkpoint``.
        ``progress(fraction, text)`` is called between stages and windows; when it returns True the prediction
        stops with :class:`PredictionCancelled` and the scene is unchanged."""
        request = self.prediction_request(volume_node, checkpoint=checkpoint, mode=mode, point_ras=point_ras,
                                          mask_ratio=mask_ratio, seed=seed, device=device)
        label = None
        if model is None:
            t0 = time.perf_counter()
            model, _config = self.load_model(checkpoint, device)
            label, load_seconds = str(self._model_path), time.perf_counter() - t0
        output = run_prediction(request, model=model, checkpoint_label=label,
                                progress=(lambda f, t: progress(0.92 * f, t)) if progress is not None else None)
        if label is not None:
            output.timings["load model"] = round(load_seconds, 3)
        if progress is not None and progress(0.92, "building glyphs"):  # the last chance to cancel
            raise PredictionCancelled("prediction cancelled")
        prediction = self.show_prediction(volume_node, output, glyph=glyph, prediction_opacity=prediction_opacity)
        if progress is not None:
            progress(1.0, "done")
        return prediction

    def show_prediction(self, volume_node, output: PredictionOutput, *, glyph: GlyphSettings | None = None,
                        prediction_opacity: float = 0.4) -> "Prediction":
        """Turn a :class:`PredictionOutput` into nodes: ellipsoid glyph model in RAS, rendered prediction as the
        foreground layer (fitted in the slice views), a table of the Gaussian parameters. Re-runs on the same CT
        reuse their nodes."""
        from medgmae_core import spatial
        from medgmae_core.data.transforms import HU_WINDOW

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
        transform_id = volume_node.GetTransformNodeID()
        old = self.last_prediction if self.last_prediction and self.last_prediction.volume_node is volume_node else None
        prediction.prediction_node = add_volume(self.scene, lo + output.pred * (hi - lo), output.pred_affine,
                                                f"{name} MedGMAE prediction",
                                                node=old.prediction_node if old else None,
                                                parent_transform_id=transform_id)
        display = prediction.prediction_node.GetDisplayNode()
        if display is not None:
            display.SetAutoWindowLevel(False)
            display.SetWindowLevelMinMax(lo, hi)
        prediction.glyph = glyph or GlyphSettings()
        prediction.model_node = old.model_node if old else None
        self._update_glyphs(prediction, force=True)
        prediction.table_node = self._update_table(prediction, old.table_node if old else None)
        prediction.prediction_opacity = float(prediction_opacity)
        set_slice_layers(self.scene, background=volume_node, foreground=prediction.prediction_node,
                         foreground_opacity=prediction_opacity, fit=True)
        prediction.timings.values["show"] = round(time.perf_counter() - t0, 3)
        self.last_prediction = prediction
        log.info("MedGMAE prediction for %s (%s): %s", name, output.checkpoint, prediction.timings.text())
        self.say(self.status_text())
        return prediction

    def window_point_ras(self, params: MedGMAEParameters):
        """The window centre for ``windowMode`` point: the *newest* control point of the chosen point list, in the
        input volume's RAS (through its parent transform); None (the volume centre) when there is none."""
        points = params.windowPoint
        if getattr(params.windowMode, "value", params.windowMode) != "point" or points is None:
            return None
        count = points.GetNumberOfControlPoints()
        if count == 0:
            return None
        point = [0.0, 0.0, 0.0]
        points.GetNthControlPointPositionWorld(count - 1, point)
        if params.inputVolume is not None and params.inputVolume.GetParentTransformNode() is not None:
            import vtk
            to_local = vtk.vtkGeneralTransform()
            params.inputVolume.GetParentTransformNode().GetTransformFromWorld(to_local)
            point = list(to_local.TransformPoint(point))
        return point

    def request_from_parameters(self, params: MedGMAEParameters) -> PredictionRequest:
        if params.inputVolume is None:
            raise ValueError(_("input CT volume: choose a CT volume in the Mask section"))
        return self.prediction_request(params.inputVolume, checkpoint=params.checkpointPath, mode=params.windowMode,
                                       point_ras=self.window_point_ras(params),
                                       mask_ratio=params.maskRatio if params.predictFromMasked else 0.0,
                                       seed=params.seed, device=params.device)

    def predict_from_parameters(self, params: MedGMAEParameters, *, interactive: bool = False,
                                progress: Callable[[float, str], None] | None = None) -> "Prediction | str":
        """In-process prediction with the panel's settings (scripts); the panel itself uses :meth:`start_prediction`."""
        try:
            return self.predict(params.inputVolume, checkpoint=params.checkpointPath, mode=params.windowMode,
                                point_ras=self.window_point_ras(params),
                                mask_ratio=params.maskRatio if params.predictFromMasked else 0.0,
                                seed=params.seed, device=params.device, glyph=GlyphSettings.from_parameters(params),
                                prediction_opacity=params.predictionOpacity, progress=progress,
                                interactive=interactive)
        except PredictionCancelled:
            return self.say(_("Prediction cancelled."))

    def start_prediction(self, params: MedGMAEParameters, *, start: bool = True) -> BackgroundJob:
        """The Predict button: the prediction runs in a background process (``python -m
        MedGMAESlicerLib.prediction``), so the torch import, model load and forward pass never block Slicer; the
        job reports progress and can be cancelled. :meth:`finish_prediction` shows its result."""
        request = self.request_from_parameters(params)
        folder = Path(tempfile.mkdtemp(prefix="medgmae_predict_"))
        request_path, output_path = request.save(folder / "request.npz"), folder / "output.npz"
        job = BackgroundJob.module("MedGMAESlicerLib.prediction", str(request_path), str(output_path),
                                   name=_("prediction"), cwd=str(folder))
        job.context = PredictionJobContext(params.inputVolume, output_path, GlyphSettings.from_parameters(params),
                                           params.predictionOpacity)
        return job.start() if start else job

    def discard_prediction(self, job: BackgroundJob) -> None:
        """A cancelled or failed prediction job: remove its files."""
        ctx = getattr(job, "context", None)
        if isinstance(ctx, PredictionJobContext):
            _remove_folder(ctx.output_path.parent)

    def finish_prediction(self, job: BackgroundJob, result: JobResult | None = None) -> str:
        """Show what a finished prediction job computed; returns the status sentence."""
        ctx: PredictionJobContext = job.context
        try:
            if ctx.volume_node is None or ctx.volume_node.GetScene() is not self.scene:
                return self.say(_("The scene was closed while predicting; the result was discarded."))
            output = PredictionOutput.load(ctx.output_path)
            self.show_prediction(ctx.volume_node, output, glyph=ctx.glyph, prediction_opacity=ctx.prediction_opacity)
            return self.last_message
        finally:
            _remove_folder(ctx.output_path.parent)

    # ------------------------------------------------------------------ display
    def _update_glyphs(self, prediction: "Prediction", force: bool = False) -> None:
        """(Re)build the glyph polydata when resolution, threshold or sigma changed; opacity always."""
        from medgmae_core.export import glyphs
        from medgmae_core.export.slicer_scene import add_glyph_model_node

        s = prediction.glyph
        key = (s.resolution, s.threshold, s.sigma)
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
        self._update_glyphs(prediction)
        if prediction_opacity is not None and float(prediction_opacity) != prediction.prediction_opacity:
            # only the slice views that show this prediction; the user's other views keep their opacity
            for comp in _composites(self.scene):
                if prediction.prediction_node is not None and \
                        comp.GetForegroundVolumeID() == prediction.prediction_node.GetID():
                    comp.SetForegroundOpacity(float(prediction_opacity))
            prediction.prediction_opacity = float(prediction_opacity)

    def update_display_from_parameters(self, params: MedGMAEParameters) -> None:
        g = GlyphSettings.from_parameters(params)
        self.update_display(opacity=g.opacity, resolution=g.resolution, threshold=g.threshold, sigma=g.sigma,
                            prediction_opacity=params.predictionOpacity)

    def _update_table(self, prediction: "Prediction", node=None):
        from medgmae_core import spatial

        scales, quats = spatial.world_axes_to_scales_quaternions(prediction.axes_ras)
        c = prediction.centres_ras
        columns = {"index": np.arange(len(c), dtype=np.int32), "R (mm)": c[:, 0], "A (mm)": c[:, 1], "S (mm)": c[:, 2],
                   "scale 1 (mm)": scales[:, 0], "scale 2 (mm)": scales[:, 1], "scale 3 (mm)": scales[:, 2],
                   "qw": quats[:, 0], "qx": quats[:, 1], "qy": quats[:, 2], "qz": quats[:, 3],
                   "intensity": prediction.intensities}
        if node is None or node.GetScene() is None:
            node = self.scene.AddNewNodeByClass("vtkMRMLTableNode", self.scene.GenerateUniqueName(
                f"{prediction.volume_node.GetName()} Gaussian parameters"))
        _slicer().util.updateTableFromArray(node, [np.ascontiguousarray(v) for v in columns.values()],
                                            list(columns))
        return node

    # ------------------------------------------------------------------ export
    def _require_prediction(self) -> "Prediction":
        if self.last_prediction is None:
            raise ValueError("nothing to export yet: run Predict first")
        return self.last_prediction

    def _export_path(self, directory, suffix: str) -> Path:
        if not is_set(directory):
            raise ValueError("export folder: choose a folder to write to")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        return directory / f"{_safe_name(self._require_prediction().volume_node.GetName())}{suffix}"

    def export_ply(self, path: str | Path) -> Path:
        """The predicted Gaussians as a 3DGS-style PLY in RAS millimetres (``medgmae_core.export.ply``)."""
        from medgmae_core.export.ply import write_gaussians_ply
        p = self._require_prediction()
        return write_gaussians_ply(path, p.gaussians, shape=p.grid_shape, ijk_to_ras=p.grid_affine)

    def export_nifti(self, path: str | Path, *, mask_path: str | Path | None = None) -> list[Path]:
        """The rendered prediction (and the last mask preview) as NIfTI (``medgmae_core.export.nifti``)."""
        from medgmae_core.export.nifti import write_volume
        p = self._require_prediction()
        written = [write_volume(path, array_ijk(p.prediction_node), ijk_to_ras(p.prediction_node), kind="prediction")]
        if mask_path is not None and self.last_mask is not None:
            written.append(write_volume(mask_path, self.last_mask.mask, ijk_to_ras(self.last_mask.label_node),
                                        kind="mask"))
        return written

    def export_ply_from_parameters(self, params: MedGMAEParameters, *, interactive: bool = False) -> str:
        path = self.export_ply(self._export_path(params.exportDirectory, "_gaussians.ply"))
        return f"Wrote {path}"

    def export_nifti_from_parameters(self, params: MedGMAEParameters, *, interactive: bool = False) -> str:
        paths = self.export_nifti(self._export_path(params.exportDirectory, "_prediction.nii.gz"),
                                  mask_path=self._export_path(params.exportDirectory, "_mask.nii.gz"))
        return "Wrote " + ", ".join(str(p) for p in paths)

    # ------------------------------------------------------------------ reconstruct results
    def write_input_ct(self, volume_node, path: str | Path) -> Path:
        """The CT a scan is simulated from, as NIfTI for the ``medgmae reconstruct`` process."""
        from medgmae_core.export.nifti import write_volume
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return write_volume(path, array_ijk(volume_node), ijk_to_ras(volume_node), kind="prediction")

    def load_reconstruction_result(self, result_or_folder) -> str:
        """Show a finished reconstruction: the volume (HU when known) and the PSNR curve (table + plot chart)."""
        import json

        from medgmae_core.export.nifti import read_volume_array

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
            table = self.scene.AddNewNodeByClass("vtkMRMLTableNode", self.scene.GenerateUniqueName("MedGMAE PSNR"))
            _slicer().util.updateTableFromArray(
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
            self.last_reconstruction.psnr_table, self.last_reconstruction.chart = table, chart
            _show_chart(chart)
        set_slice_layers(self.scene, background=node, fit=True)
        final = _(" Its PSNR against the reference is {psnr:.2f} dB.").format(psnr=metrics["psnr"]) \
            if isinstance(metrics.get("psnr"), (int, float)) else ""
        return self.say(_("The reconstruction is shown in the slice views ({file} from {folder}).").format(
            file=volume_path.name, folder=folder) + final)

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


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "volume"


def _show_chart(chart) -> None:
    """Show a plot chart in the app's plot view (no-op headless)."""
    try:
        import slicer
        slicer.modules.plots.logic().ShowChartInLayout(chart)
    except (AttributeError, ImportError):
        pass


@dataclass
class ReconstructionResult:
    volume_node: object
    psnr_table: object
    chart: object
    metrics: dict


def _translation(offset) -> np.ndarray:
    t = np.eye(4)
    t[:3, 3] = np.asarray(offset, dtype=np.float64)
    return t


@dataclass
class GlyphSettings:
    opacity: float = 0.6
    resolution: int = 8
    threshold: float = 0.1  # fraction of the strongest Gaussian's intensity (robust to the model's intensity scale)
    sigma: int = 2

    @classmethod
    def from_parameters(cls, params: MedGMAEParameters) -> "GlyphSettings":
        return cls(params.glyphOpacity, params.glyphResolution, params.intensityThreshold,
                   int(getattr(params.glyphSigma, "value", params.glyphSigma)))

    def geometry(self) -> tuple:
        """What needs the glyph polydata rebuilt (opacity does not)."""
        return self.resolution, self.threshold, self.sigma


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
class PredictionJobContext:
    """What the panel needs to show a background prediction when it finishes."""
    volume_node: object
    output_path: Path
    glyph: GlyphSettings
    prediction_opacity: float


def _remove_folder(folder: Path) -> None:
    import shutil
    shutil.rmtree(folder, ignore_errors=True)
