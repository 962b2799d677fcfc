"""A button + progress bar + status label that run one background job: Apply turns into Cancel.

Qt-agnostic: it only sets ``text``, ``value``, ``enabled`` and ``visible`` (or calls ``setText`` ... when the
object has them) on the objects it is given, so the widget passes the .ui's widgets and tests pass plain objects.
The widget's ``qt.QTimer`` calls :meth:`poll`. Cancel never blocks: the button reads "Cancelling..." and is
disabled until :meth:`poll` sees the process tree gone.
"""
from __future__ import annotations

import logging
from typing import Callable

from .compat import translator
from .jobs import BackgroundJob, JobResult, JobState, progress_fraction

_ = translator()
log = logging.getLogger(__name__)


def _set(widget, name: str, value) -> None:
    setter = getattr(widget, "set" + name[0].upper() + name[1:], None)
    if callable(setter):
        setter(value)
    else:
        setattr(widget, name, value)


def format_record(record: dict) -> str:
    """One-line readout of a progress record: ``step 40 of 200 · loss 0.01235 · psnr 31.2``."""
    parts = []
    if "step" in record:
        parts.append(f"step {record['step']}" + (f" of {record['total']}" if record.get("total") else ""))
    for key, value in record.items():
        if key in ("event", "command", "time", "step", "total", "path"):
            continue
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        elif isinstance(value, (int, str)) and len(str(value)) < 40:
            parts.append(f"{key} {value}")
    return " · ".join(parts)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


class JobPanel:
    """One background job at a time. ``start()`` returns the (started or not) ``BackgroundJob``;
    ``on_finished(result)`` turns a successful result into the status text (it may raise: the error is shown);
    ``on_state_changed(busy)`` lets the widget block conflicting actions while the job runs."""

    def __init__(self, button, progress_bar, status_label, start: Callable[[], BackgroundJob], *,
                 idle_text: str, cancel_text: str = "Cancel", title: str = "",
                 on_finished: Callable[[JobResult], str | None] | None = None,
                 on_state_changed: Callable[[bool], None] | None = None,
                 describe: Callable[[dict], str] = format_record) -> None:
        self.button, self.progress_bar, self.status_label = button, progress_bar, status_label
        self.start_job, self.idle_text, self.cancel_text = start, idle_text, cancel_text
        self.title = title
        self.on_finished, self.on_state_changed, self.describe = on_finished, on_state_changed, describe
        self.job: BackgroundJob | None = None
        self._active = False  # a job this panel started has not been reported finished yet

    @property
    def running(self) -> bool:
        """A job is running (possibly being cancelled)."""
        return self._active and self.job is not None and self.job.result is None

    @property
    def cancelling(self) -> bool:
        return self.running and self.job.is_cancelling

    def toggle(self) -> None:
        """The button's click: start when idle, cancel when running."""
        self.cancel() if self.running else self.start()

    def start(self) -> None:
        try:
            self.job = self.start_job()
            if self.job is None:  # the starter declined (e.g. dependencies not installed): it said why
                return
            if self.job.state == JobState.IDLE:
                self.job.start()
        except Exception as exc:  # a bad parameter or a missing file: say so, stay idle
            log.exception("%s could not start", self.title or "job")
            self.job = None
            _set(self.status_label, "text", _("Could not start: {error}").format(error=exc))
            return
        self._active = True
        _set(self.button, "text", self.cancel_text)
        _set(self.progress_bar, "value", 0)
        _set(self.progress_bar, "visible", True)
        _set(self.status_label, "text", _("Starting {title}...").format(title=self.title or self.job.name))
        self._notify(True)

    def cancel(self) -> None:
        """Ask the job to stop and return at once; :meth:`poll` finishes the panel when the process is gone."""
        if self.running and not self.cancelling:
            self.job.cancel()
            _set(self.status_label, "text", _("Cancelling {title}...").format(title=self.title or self.job.name))
            _set(self.button, "text", _("Cancelling..."))
            _set(self.button, "enabled", False)
        self.poll()

    def poll(self) -> None:
        """Read new progress lines; update the bar and readout; finish when the job ends."""
        if self.job is None:
            return
        for record in self.job.poll():
            if self.job.is_cancelling:
                continue
            event = record.get("event")
            if event == "progress":
                _set(self.progress_bar, "value", int(round(100 * progress_fraction(record))))
                _set(self.status_label, "text", self.describe(record))
            elif event == "checkpoint":
                _set(self.status_label, "text", _("Saved a checkpoint at step {step}: {path}").format(
                    step=record.get("step"), path=record.get("path")))
        if self.job.result is not None and self._active:
            self._finish(self.job.result)

    def _finish(self, result: JobResult) -> None:
        self._active = False
        _set(self.button, "text", self.idle_text)
        _set(self.button, "enabled", True)
        if result.ok:
            _set(self.progress_bar, "value", 100)
            try:
                message = self.on_finished(result) if self.on_finished else None
            except Exception as exc:  # loading the results failed: the job itself succeeded
                log.exception("%s: loading the results failed", self.title or self.job.name)
                message = _("Finished, but the results could not be loaded: {error}").format(error=exc)
            checkpoint = result.outputs().get("checkpoint")
            default = _("{title} finished in {duration}.").format(
                title=(self.title or self.job.name).capitalize(), duration=_duration(self.job.elapsed))
            if checkpoint:
                default += " " + _("Checkpoint: {path}").format(path=checkpoint)
            _set(self.status_label, "text", message or default)
        elif result.state == JobState.CANCELLED:
            ckpts = result.checkpoints()
            _set(self.status_label, "text", _("Cancelled.") + (
                " " + _("Last checkpoint: {path}").format(path=ckpts[-1]) if ckpts else ""))
            _set(self.progress_bar, "visible", False)
        else:
            log.error("%s", result.error)
            _set(self.status_label, "text", result.error)
            _set(self.progress_bar, "visible", False)
        self._notify(False)

    def _notify(self, busy: bool) -> None:
        if self.on_state_changed is not None:
            self.on_state_changed(busy)
