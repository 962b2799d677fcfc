"""The module panel's behaviour, on the .ui's widgets: what each button does, what is enabled when, and the jobs.

``MedGMAESlicer.py`` only creates this with the widgets from ``slicer.util.childWidgetVariables`` and the module
logic. It is plain Python over PythonQt-style widgets (``button.enabled = False``, ``label.text = ...``,
``signal.connect(...)``), so tests drive it with stand-ins.

- Dependencies are checked when the panel opens (one message, no import of torch) and again at first use of an
  action, which asks before installing anything (:class:`.install.InstallLogic`).
- Predict runs in a background process like Train and Reconstruct: the button becomes Cancel, a progress bar
  follows the process, and while it runs the actions that would conflict (Preview mask, Export, Install) are
  disabled. Closing the scene cancels it.
- Display controls: opacity changes apply at once; glyph geometry (resolution, threshold, scale) is rebuilt once
  the control has been still for a moment, not on every slider tick.
"""
from __future__ import annotations

import logging
from typing import Callable

import slicer

from .compat import translator
from .display import GlyphSettings
from .install import DependencyError, InstallLogic
from .jobpanel import JobPanel
from .parameters import MedGMAEParameters, path_parameters

_ = translator()
log = logging.getLogger(__name__)

POLL_MS = 250
GLYPH_DELAY_MS = 250


def _stage_text(record: dict) -> str:
    stage = record.get("stage") or ""
    percent = int(round(100 * record.get("step", 0) / max(record.get("total") or 1, 1)))
    return _("Predicting: {stage} ({percent}%)").format(stage=stage, percent=percent)


class MedGMAEPanel:
    """The panel's behaviour. ``parameters()`` returns the current :class:`MedGMAEParameters` (or None without a
    parameter node); ``timer_factory`` makes ``qt.QTimer``-like objects; ``guard(message)`` is
    ``slicer.util.tryWithErrorDisplay`` (shows the error, then re-raises)."""

    def __init__(self, ui, logic, *, parameters: Callable[[], MedGMAEParameters | None], timer_factory,
                 install_logic: InstallLogic | None = None, guard=None) -> None:
        self.ui, self.logic, self.parameters = ui, logic, parameters
        self.install_logic = install_logic or InstallLogic(log=self._install_progress)
        self.guard = guard or _slicer_guard
        self._dependencies_ok = False

        self.predictPanel = JobPanel(ui.predictButton, ui.predictProgressBar, ui.predictStatusLabel,
                                     lambda: self._start(self.logic.start_prediction, ui.predictStatusLabel),
                                     idle_text=ui.predictButton.text, title=_("prediction"),
                                     on_finished=lambda result: self.logic.finish_prediction(self.predictPanel.job,
                                                                                             result),
                                     on_state_changed=self._busy_changed, describe=_stage_text)
        self.trainPanel = JobPanel(ui.trainButton, ui.trainProgressBar, ui.trainStatusLabel,
                                   lambda: self._start(self.logic.start_training_from_parameters, ui.trainStatusLabel),
                                   idle_text=ui.trainButton.text, title=_("training"),
                                   on_state_changed=self._busy_changed)
        self.reconPanel = JobPanel(ui.reconButton, ui.reconProgressBar, ui.reconStatusLabel,
                                   lambda: self._start(self.logic.start_reconstruction_from_parameters,
                                                       ui.reconStatusLabel),
                                   idle_text=ui.reconButton.text, title=_("reconstruction"),
                                   on_finished=lambda result: self.logic.load_reconstruction_result(result),
                                   on_state_changed=self._busy_changed)
        self.jobPanels = (self.predictPanel, self.trainPanel, self.reconPanel)

        ui.previewMaskButton.clicked.connect(self.preview_mask)
        ui.predictButton.clicked.connect(self.predictPanel.toggle)
        ui.trainButton.clicked.connect(self.trainPanel.toggle)
        ui.reconButton.clicked.connect(self.reconPanel.toggle)
        ui.exportPlyButton.clicked.connect(lambda: self._act(ui.predictStatusLabel, self.logic.export_ply_from_parameters,
                                                             _("Export failed.")))
        ui.exportNiftiButton.clicked.connect(lambda: self._act(ui.predictStatusLabel,
                                                               self.logic.export_nifti_from_parameters,
                                                               _("Export failed.")))
        ui.checkDependenciesButton.clicked.connect(self.check_dependencies)
        ui.installDependenciesButton.clicked.connect(self.install_dependencies)
        ui.windowPointSelector.currentNodeChanged.connect(ui.windowPointPlaceWidget.setCurrentNode)

        self.jobTimer = timer_factory()
        self.jobTimer.setInterval(POLL_MS)
        self.jobTimer.timeout.connect(self.poll)
        self.jobTimer.start()
        self.glyphTimer = timer_factory()
        self.glyphTimer.setSingleShot(True)
        self.glyphTimer.setInterval(GLYPH_DELAY_MS)
        self.glyphTimer.timeout.connect(self._apply_glyph_geometry)
        self._pending_glyph = None
        self.check_dependencies()

    # ---------------------------------------------------------------- state
    @property
    def busy(self) -> bool:
        return any(p.running for p in self.jobPanels)

    def poll(self) -> None:
        for panel in self.jobPanels:
            panel.poll()

    def _busy_changed(self, busy: bool = False) -> None:
        job = self.predictPanel.job
        if not busy and job is not None and job.result is not None and not job.result.ok:
            self.logic.discard_prediction(job)  # cancelled or failed: its temporary files go
        self.update_enabled()

    def update_enabled(self, params: MedGMAEParameters | None = None) -> None:
        """Enable what can run now; block what would conflict with a running job."""
        params = params if params is not None else self.parameters()
        ui = self.ui
        predicting = self.predictPanel.running
        has_input = params is not None and params.inputVolume is not None
        ui.previewMaskButton.enabled = has_input and not predicting
        ui.predictButton.enabled = (has_input or predicting) and not self.predictPanel.cancelling
        has_prediction = self.logic.last_prediction is not None
        ui.exportPlyButton.enabled = ui.exportNiftiButton.enabled = has_prediction and not predicting
        ui.installDependenciesButton.enabled = ui.checkDependenciesButton.enabled = not self.busy

    def on_parameters_modified(self) -> None:
        params = self.parameters()
        self.update_enabled(params)
        if params is not None and self.logic.last_prediction is not None:
            self._sync_display(params)

    def normalize_parameters(self, wrapper) -> None:
        """Scenes saved when paths were ``pathlib.Path`` hold "." for an empty path: show it empty."""
        for name in path_parameters():
            if getattr(wrapper, name) == ".":
                setattr(wrapper, name, "")

    # ---------------------------------------------------------------- display
    def _sync_display(self, params: MedGMAEParameters) -> None:
        prediction = self.logic.last_prediction
        wanted = GlyphSettings.from_parameters(params)
        if wanted.opacity != prediction.glyph.opacity or params.predictionOpacity != prediction.prediction_opacity:
            self.logic.update_display(opacity=wanted.opacity, prediction_opacity=params.predictionOpacity)
        if wanted.geometry() != prediction.glyph.geometry():
            self._pending_glyph = wanted
            self.glyphTimer.start()  # (re)started: the glyphs are rebuilt once the control is still
        else:
            self._pending_glyph = None
            self.glyphTimer.stop()

    def _apply_glyph_geometry(self) -> None:
        wanted, self._pending_glyph = self._pending_glyph, None
        if wanted is None or self.logic.last_prediction is None:
            return
        self.logic.update_display(resolution=wanted.resolution, threshold=wanted.threshold, sigma=wanted.sigma)
        self.ui.predictStatusLabel.text = self.logic.status_text()

    # ---------------------------------------------------------------- actions
    def preview_mask(self) -> None:
        if self.ensure_dependencies(self.ui.maskStatusLabel):
            self._act(self.ui.maskStatusLabel, self.logic.preview_mask_from_parameters, _("Mask preview failed."))

    def _act(self, label, action, failure: str) -> None:
        params = self.parameters()
        if params is None:
            return
        try:
            with self.guard(failure, waitCursor=True):
                result = action(params, interactive=True)
        except Exception as exc:  # shown by the guard (an error dialog); the panel stays usable
            log.exception("%s", failure)
            label.text = f"{failure} {exc}"
        else:
            label.text = result if isinstance(result, str) else self.logic.last_message
        self.update_enabled()

    def _start(self, start: Callable, label):
        """Start a background job after making sure the dependencies are there; None (and a message) if not."""
        params = self.parameters()
        if params is None or not self.ensure_dependencies(label):
            return None
        return start(params)

    # ---------------------------------------------------------------- dependencies
    def check_dependencies(self) -> bool:
        """Show in one message what is missing (metadata only; nothing imported or installed)."""
        report = self.install_logic.check()
        self._show_report(report)
        self._dependencies_ok = report.ok
        return report.ok

    def _show_report(self, report) -> None:
        self.ui.installStatusLabel.text = report.summary()
        self.ui.dependencyStatusLabel.text = "" if report.ok else report.summary()
        self.ui.dependencyStatusLabel.visible = not report.ok
        if not report.ok:
            self.ui.installCollapsibleButton.collapsed = False
        log.info("MedGMAE dependencies:\n%s", report.details())

    def ensure_dependencies(self, label) -> bool:
        """At first use: True when everything is installed; otherwise ask, install, and say what happened."""
        if self._dependencies_ok:
            return True
        return self._install(label, self.install_logic.ensure)

    def install_dependencies(self) -> None:
        self._install(self.ui.installStatusLabel, lambda: self.install_logic.install(ask_confirmation=True))

    def _install(self, label, install: Callable) -> bool:
        if self.busy:
            label.text = _("Wait for the running job to finish (or cancel it) before installing packages.")
            return False
        try:
            report = install()
        except DependencyError as exc:
            label.text = str(exc)
            self.ui.installStatusLabel.text = str(exc)
            return False
        except Exception as exc:  # pip or the PyTorch extension failed: say so, keep the panel usable
            log.exception("Installing MedGMAE's dependencies failed")
            label.text = _("Installing the dependencies failed: {error}. See the Python console for the log.").format(
                error=exc)
            return False
        self._show_report(report)
        self._dependencies_ok = report.ok
        if not report.ok:
            label.text = report.summary()
        return report.ok

    def _install_progress(self, message: str) -> None:
        self.ui.installStatusLabel.text = message
        log.info("%s", message)

    # ---------------------------------------------------------------- scene and teardown
    def on_scene_start_close(self) -> None:
        """A prediction for nodes that are going away is cancelled (its result would be discarded anyway)."""
        if self.predictPanel.running:
            self.predictPanel.cancel()
        self._pending_glyph = None
        self.glyphTimer.stop()
        self.logic.reset()

    def cleanup(self) -> None:
        """Stop the timers and ask running jobs to stop (without waiting: the GUI never freezes on exit)."""
        self.jobTimer.stop()
        self.glyphTimer.stop()
        for panel in self.jobPanels:
            if panel.running:
                panel.job.cancel()


def _slicer_guard(message, waitCursor=False):
    return slicer.util.tryWithErrorDisplay(message, waitCursor=waitCursor)
