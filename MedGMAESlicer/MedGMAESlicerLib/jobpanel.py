"""A button + progress bar + status label that run one background job: Apply turns into Cancel.

Qt-agnostic: it only sets ``text``, ``value``, ``visible``/``setVisible`` on the objects it is given, so the
widget passes the .ui's widgets and tests pass plain objects. The widget's ``qt.QTimer`` calls :meth:`poll`.
"""
from __future__ import annotations

from typing import Callable

from .jobs import BackgroundJob, JobResult, JobState, progress_fraction


def _set(widget, name: str, value) -> None:
    setter = getattr(widget, "set" + name[0].upper() + name[1:], None)
    if callable(setter):
        setter(value)
    else:
        setattr(widget, name, value)


def format_record(record: dict) -> str:
    """One-line readout of a progress record: ``step 40/200  loss 0.0123  psnr 31.2`` ."""
    parts = []
    if "step" in record:
        parts.append(f"step {record['step']}" + (f"/{record['total']}" if record.get("total") else ""))
    for key, value in record.items():
        if key in ("event", "command", "time", "step", "total", "path"):
            continue
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        elif isinstance(value, (int, str)) and len(str(value)) < 40:
            parts.append(f"{key} {value}")
    return "  ".join(parts)


class JobPanel:
    def __init__(self, button, progress_bar, status_label, start: Callable[[], BackgroundJob], *,
                 idle_text: str, cancel_text: str = "Cancel",
                 on_finished: Callable[[JobResult], str | None] | None = None) -> None:
        self.button, self.progress_bar, self.status_label = button, progress_bar, status_label
        self.start_job, self.idle_text, self.cancel_text = start, idle_text, cancel_text
        self.on_finished = on_finished
        self.job: BackgroundJob | None = None

    @property
    def running(self) -> bool:
        return self.job is not None and self.job.is_running

    def toggle(self) -> None:
        """The button's click: start when idle, cancel when running."""
        self.cancel() if self.running else self.start()

    def start(self) -> None:
        try:
            self.job = self.start_job()
            if self.job.state == JobState.IDLE:
                self.job.start()
        except Exception as exc:  # a bad parameter or a missing file: say so, stay idle
            self.job = None
            _set(self.status_label, "text", f"Could not start: {exc}")
            return
        _set(self.button, "text", self.cancel_text)
        _set(self.progress_bar, "value", 0)
        _set(self.progress_bar, "visible", True)
        _set(self.status_label, "text", f"Starting {self.job.name}...")

    def cancel(self) -> None:
        if self.running:
            _set(self.status_label, "text", f"Cancelling {self.job.name}...")
            self.job.cancel()
        self.poll()

    def poll(self) -> None:
        """Read new progress lines; update the bar and readout; finish when the job ends."""
        if self.job is None:
            return
        for record in self.job.poll():
            event = record.get("event")
            if event == "progress":
                _set(self.progress_bar, "value", int(round(100 * progress_fraction(record))))
                _set(self.status_label, "text", format_record(record))
            elif event == "checkpoint":
                _set(self.status_label, "text", f"checkpoint at step {record.get('step')}: {record.get('path')}")
        if self.job.result is not None and self.button_text_is_cancel():
            self._finish(self.job.result)

    def button_text_is_cancel(self) -> bool:
        text = getattr(self.button, "text", "")
        return (text() if callable(text) else text) == self.cancel_text

    def _finish(self, result: JobResult) -> None:
        _set(self.button, "text", self.idle_text)
        if result.ok:
            _set(self.progress_bar, "value", 100)
            message = self.on_finished(result) if self.on_finished else None
            checkpoint = result.outputs().get("checkpoint")
            _set(self.status_label, "text", message or f"{self.job.name} finished in {self.job.elapsed:.0f} s"
                 + (f"; checkpoint: {checkpoint}" if checkpoint else ""))
        elif result.state == JobState.CANCELLED:
            ckpts = result.checkpoints()
            _set(self.status_label, "text", "Cancelled." + (f" Last checkpoint: {ckpts[-1]}" if ckpts else ""))
        else:
            _set(self.status_label, "text", result.error)
