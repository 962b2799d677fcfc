"""Progress reporting: a tqdm bar for people, or JSON lines for programs.

The JSON-lines format is the contract between every long-running command
(pretrain, finetune, reconstruct) and the Slicer panels that read them.
One object per line on stdout, each with an ``event`` key:

* ``{"event": "start", "command": str, "total": int, ...}``
* ``{"event": "progress", "step": int, "total": int, ...metrics}``
* ``{"event": "checkpoint", "step": int, "path": str}``
* ``{"event": "done", "step": int, ...outputs}``
* ``{"event": "error", "message": str}``: one line naming the file or parameter. ``cli.main`` emits it for
  every command that fails (unless the command already did), then exits with code 2 for user errors.
"""
from __future__ import annotations

import json
import math
import sys
import time
from typing import Any, TextIO

from tqdm import tqdm


_counts = {"error_events": 0, "json_reporters": 0}


def error_events_emitted() -> int:
    """How many ``error`` events have been emitted in this process (``cli.main`` avoids emitting a second)."""
    return _counts["error_events"]


def json_lines_used() -> bool:
    """True if a JSON-lines reporter was created since :func:`reset_json_lines_used`."""
    return _counts["json_reporters"] > 0


def reset_json_lines_used() -> None:
    _counts["json_reporters"] = 0


def json_plain(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_plain(v) for v in value]
    return value


class ProgressReporter:
    """Report start/progress/checkpoint/done/error events.

    With ``json_lines=True`` every event is a flushed JSON line on ``stream``
    (stdout by default); otherwise a tqdm bar shows progress and other events
    are printed as short human-readable lines on stderr.
    """

    def __init__(self, command: str, total: int, *, json_lines: bool = False,
                 stream: TextIO | None = None, initial: int = 0) -> None:
        self.command = command
        self.total = int(total)
        self.json_lines = json_lines
        self.stream = stream if stream is not None else sys.stdout
        self._bar = None
        self._t0 = time.time()
        if json_lines:
            _counts["json_reporters"] += 1
        else:
            self._bar = tqdm(total=self.total, initial=initial, desc=command, file=sys.stderr,
                             dynamic_ncols=True)

    def emit(self, event: str, **fields: Any) -> None:
        record = {"event": event, "command": self.command, "time": round(time.time() - self._t0, 3)}
        record.update(json_plain(fields))
        if self.json_lines and event == "error":
            _counts["error_events"] += 1
        if self.json_lines:
            self.stream.write(json.dumps(record) + "\n")
            self.stream.flush()
        elif event not in ("progress", "error"):  # errors: one line from cli.main, not two
            text = " ".join(f"{k}={v}" for k, v in record.items() if k not in ("event", "command", "time"))
            msg = f"[{self.command}] {event}: {text}"
            (self._bar.write(msg, file=sys.stderr) if self._bar else print(msg, file=sys.stderr))

    def start(self, **fields: Any) -> None:
        self.emit("start", total=self.total, **fields)

    def progress(self, step: int, **metrics: Any) -> None:
        if self.json_lines:
            self.emit("progress", step=step, total=self.total, **metrics)
        elif self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in json_plain(metrics).items()},
                                  refresh=False)
            self._bar.refresh()

    def checkpoint(self, step: int, path: str) -> None:
        self.emit("checkpoint", step=step, path=str(path))

    def done(self, **fields: Any) -> None:
        self.close()
        self.emit("done", **fields)

    def error(self, message: str) -> None:
        self.close()
        self.emit("error", message=message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
