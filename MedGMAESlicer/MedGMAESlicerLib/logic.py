"""The module logic: a thin facade over three parts, each a plain class that tests drive on its own.

- ``prediction`` (:class:`.prediction.PredictionLogic`): masking and predicting Gaussians, on arrays; loads and
  caches the model, runs the prediction in this process or starts the worker process. No MRML.
- ``display`` (:class:`.display.DisplayLogic`): results into the MRML scene and out of it: mask preview nodes, the
  glyph model, the rendered prediction layer, the parameter table, the window point, PLY/NIfTI export, the
  results of a reconstruction run. Computes nothing.
- ``background`` (:class:`.background.BackgroundLogic`): Train and Reconstruct as ``medgmae`` CLI processes.

:class:`MedGMAELogic` keeps one method per panel action, each with an ``interactive=False`` path (no dialogs,
blocking jobs), so the panel, batch scripts, the self-tests and tests call the same code. Its methods only move
arrays and nodes from one part to the next and say what happened (status sentences for the person at the panel;
timings go to the log); methods that would only forward a call are made by :func:`_delegate`. The panel predicts
in a background process (:meth:`MedGMAELogic.start_prediction`), scripts in-process (:meth:`MedGMAELogic.predict`);
both end in ``display.show_prediction``. In Slicer, ``MedGMAESlicerLogic`` (``MedGMAESlicer.py``) is this facade
plus ``ScriptedLoadableModuleLogic``.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Callable

from .background import BackgroundLogic
from .compat import translator
from .display import (MASK_LABEL, DisplayLogic, GlyphSettings, MaskPreview, Prediction, ReconstructionResult,
                      add_volume, array_ijk, ijk_to_ras, newest_point_ras)
from .jobs import BackgroundJob, JobResult
from .parameters import MedGMAEParameters, choice_value
from .prediction import (PredictionCancelled, PredictionLogic, PredictionOutput, PredictionRequest, default_checkpoint,
                         patch_mask)

_ = translator()
log = logging.getLogger(__name__)

# the parts, and what scripts import from here (the MRML helpers and result types live in display.py)
__all__ = ["MedGMAELogic", "PredictionLogic", "DisplayLogic", "BackgroundLogic", "PredictionCancelled", "Prediction",
           "GlyphSettings", "MaskPreview", "ReconstructionResult", "default_checkpoint", "add_volume", "array_ijk",
           "ijk_to_ras", "patch_mask", "MASK_LABEL"]


def _delegate(part: str, method: Callable) -> Callable:
    """A facade method that forwards to ``self.<part>.<method name>`` (it shows the part's signature and docstring)."""
    name = method.__name__

    @functools.wraps(method)
    def forward(self, *args, **kwargs):
        return getattr(getattr(self, part), name)(*args, **kwargs)

    forward.__qualname__ = f"MedGMAELogic.{name}"
    return forward


class MedGMAELogic:
    """All panel actions, over the ``prediction``, ``display`` and ``background`` parts.

    ``scene`` defaults to ``slicer.mrmlScene`` (the app's, or the one a script set). The parts can be given (tests
    pass fakes or parts they built); by default the background part writes a simulated scan's CT through the display
    part."""

    def __init__(self, scene=None, *, log_callback: Callable[[str], None] | None = None,
                 prediction: PredictionLogic | None = None, display: DisplayLogic | None = None,
                 background: BackgroundLogic | None = None) -> None:
        self.prediction = prediction or PredictionLogic()
        self.display = display or DisplayLogic(scene)
        self.background = background or BackgroundLogic(ct_writer=self.display.write_input_ct)
        self.log_callback = log_callback or log.info
        self.last_message = ""

    @property
    def scene(self):
        return self.display.scene

    @property
    def last_mask(self) -> MaskPreview | None:
        return self.display.last_mask

    @property
    def last_prediction(self) -> Prediction | None:
        return self.display.last_prediction

    @property
    def last_reconstruction(self) -> ReconstructionResult | None:
        return self.display.last_reconstruction

    def reset(self) -> None:
        """Forget results (the scene is closing); the loaded model stays cached."""
        self.display.reset()
        self.last_message = ""

    def say(self, message: str) -> str:
        """Record a status message (shown in the panel) and log it."""
        self.last_message = message
        self.log_callback(message)
        return message

    # ------------------------------------------------------------------ mask
    def preview_mask(self, volume_node, *, mask_ratio: float = 0.75, patch_size: int = 12, seed: int = 0,
                     show: bool = True, interactive: bool = False) -> MaskPreview:
        """A masked copy of ``volume_node`` (hidden patches set to the volume minimum) and a label map of the mask."""
        masked = self.prediction.mask(array_ijk(volume_node), mask_ratio=mask_ratio, patch_size=patch_size, seed=seed)
        preview = self.display.show_mask(volume_node, masked, show=show)
        self.say(_("Masked {fraction:.0%} of {name} in cubes of {size} voxels (random seed {seed}). The masked copy is "
                   "shown with the hidden cubes in the label layer.").format(
                       fraction=preview.hidden_fraction, name=volume_node.GetName(), size=patch_size, seed=seed))
        return preview

    def preview_mask_from_parameters(self, params: MedGMAEParameters, *, interactive: bool = False) -> MaskPreview:
        return self.preview_mask(params.inputVolume, mask_ratio=params.maskRatio, patch_size=params.patchSize,
                                 seed=params.seed, interactive=interactive)

    # ------------------------------------------------------------------ predict
    load_model = _delegate("prediction", PredictionLogic.load_model)

    def prediction_request(self, volume_node, **settings) -> PredictionRequest:
        """The CT node's voxels and IJKToRAS with the settings (``PredictionLogic.request``'s keywords) as a
        :class:`PredictionRequest`, which holds no node: it can go to another process."""
        return self.prediction.request(array_ijk(volume_node), ijk_to_ras(volume_node), **settings)

    def predict(self, volume_node, *, checkpoint: str | Path | None = None, mode: str = "point",
                point_ras=None, mask_ratio: float = 0.0, seed: int = 0, device: str = "auto",
                glyph: GlyphSettings | None = None, prediction_opacity: float = 0.4, model=None,
                progress: Callable[[float, str], bool | None] | None = None, interactive: bool = False) -> Prediction:
        """Predict in this process and show the result (scripts and tests; the panel uses :meth:`start_prediction`).

        One model window around ``point_ras`` (``mode="point"``; default: the volume centre) or the whole volume
        (``mode="whole"``, sliding windows). ``model`` (an already loaded model) replaces ``checkpoint``.
        ``progress(fraction, text)`` is called between stages and windows; when it returns True the prediction
        stops with :class:`PredictionCancelled` and the scene is unchanged."""
        request = self.prediction_request(volume_node, checkpoint=checkpoint, mode=mode, point_ras=point_ras,
                                          mask_ratio=mask_ratio, seed=seed, device=device)
        output = self.prediction.predict(request, model=model,
                                         progress=(lambda f, t: progress(0.92 * f, t)) if progress is not None else None)
        if progress is not None and progress(0.92, "building glyphs"):  # the last chance to cancel
            raise PredictionCancelled("prediction cancelled")
        prediction = self.show_prediction(volume_node, output, glyph=glyph, prediction_opacity=prediction_opacity)
        if progress is not None:
            progress(1.0, "done")
        return prediction

    def show_prediction(self, volume_node, output: PredictionOutput, *, glyph: GlyphSettings | None = None,
                        prediction_opacity: float = 0.4) -> Prediction:
        """Show a :class:`PredictionOutput` (``DisplayLogic.show_prediction``) and say what is shown."""
        prediction = self.display.show_prediction(volume_node, output, glyph=glyph,
                                                  prediction_opacity=prediction_opacity)
        self.say(self.display.status_text())
        return prediction

    def window_point_ras(self, params: MedGMAEParameters):
        """The window centre for ``windowMode`` point: the *newest* control point of the chosen point list, in the
        input volume's RAS; None (the volume centre) when there is none, or for the whole volume."""
        if choice_value(params.windowMode) != "point":
            return None
        return newest_point_ras(params.windowPoint, params.inputVolume)

    def request_from_parameters(self, params: MedGMAEParameters) -> PredictionRequest:
        if params.inputVolume is None:
            raise ValueError(_("input CT volume: choose a CT volume in the Mask section"))
        return self.prediction_request(params.inputVolume, checkpoint=params.checkpointPath, mode=params.windowMode,
                                       point_ras=self.window_point_ras(params),
                                       mask_ratio=params.maskRatio if params.predictFromMasked else 0.0,
                                       seed=params.seed, device=params.device)

    def predict_from_parameters(self, params: MedGMAEParameters, *, interactive: bool = False,
                                progress: Callable[[float, str], None] | None = None) -> Prediction | str:
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
        show = {"glyph": GlyphSettings.from_parameters(params), "prediction_opacity": params.predictionOpacity}
        return self.prediction.start_job(self.request_from_parameters(params), volume_node=params.inputVolume,
                                         show=show, start=start)

    discard_prediction = _delegate("prediction", PredictionLogic.discard)

    def finish_prediction(self, job: BackgroundJob, result: JobResult | None = None) -> str:
        """Show what a finished prediction job computed; returns the status sentence. Its files go either way."""
        ctx = job.context
        try:
            if ctx.volume_node is None or ctx.volume_node.GetScene() is not self.scene:
                return self.say(_("The scene was closed while predicting; the result was discarded."))
            self.show_prediction(ctx.volume_node, self.prediction.job_output(job), **ctx.show)
            return self.last_message
        finally:
            self.prediction.discard(job)

    # ------------------------------------------------------------------ display and export
    update_display = _delegate("display", DisplayLogic.update_display)
    status_text = _delegate("display", DisplayLogic.status_text)
    export_ply = _delegate("display", DisplayLogic.export_ply)
    export_nifti = _delegate("display", DisplayLogic.export_nifti)

    def update_display_from_parameters(self, params: MedGMAEParameters) -> None:
        g = GlyphSettings.from_parameters(params)
        self.display.update_display(opacity=g.opacity, resolution=g.resolution, threshold=g.threshold, sigma=g.sigma,
                                    prediction_opacity=params.predictionOpacity)

    def export_ply_from_parameters(self, params: MedGMAEParameters, *, interactive: bool = False) -> str:
        path = self.display.export_ply(self.display.export_path(params.exportDirectory, "_gaussians.ply"))
        return f"Wrote {path}"

    def export_nifti_from_parameters(self, params: MedGMAEParameters, *, interactive: bool = False) -> str:
        paths = self.display.export_nifti(self.display.export_path(params.exportDirectory, "_prediction.nii.gz"),
                                          mask_path=self.display.export_path(params.exportDirectory, "_mask.nii.gz"))
        return "Wrote " + ", ".join(str(p) for p in paths)

    # ------------------------------------------------------------------ train and reconstruct
    training_command = _delegate("background", BackgroundLogic.training_command)
    start_training = _delegate("background", BackgroundLogic.start_training)
    start_training_from_parameters = _delegate("background", BackgroundLogic.start_training_from_parameters)
    run_training = _delegate("background", BackgroundLogic.run_training)
    reconstruction_command = _delegate("background", BackgroundLogic.reconstruction_command)
    start_reconstruction = _delegate("background", BackgroundLogic.start_reconstruction)
    start_reconstruction_from_parameters = _delegate("background", BackgroundLogic.start_reconstruction_from_parameters)
    run_reconstruction = _delegate("background", BackgroundLogic.run_reconstruction)
    write_input_ct = _delegate("display", DisplayLogic.write_input_ct)

    def load_reconstruction_result(self, result_or_folder) -> str:
        """Show a finished reconstruction (``DisplayLogic.load_reconstruction_result``) and say so."""
        return self.say(self.display.load_reconstruction_result(result_or_folder))
