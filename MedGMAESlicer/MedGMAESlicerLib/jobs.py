"""Background processes for long jobs (pre-train, fine-tune, reconstruct), never in Slicer's GUI thread.

A :class:`BackgroundJob` starts ``python -m medgmae_core.cli <command> ... --progress-json`` in its own
process group (POSIX session / Windows process group), reads the JSON progress lines of
``medgmae_core.progress`` on reader threads, and hands them out through :meth:`BackgroundJob.poll`,
which the widget calls from a ``qt.QTimer`` and tests call directly. :meth:`BackgroundJob.cancel`
kills the whole process tree; :meth:`BackgroundJob.wait_for_completion` is the blocking path for
batch scripts. Pure Python: no Qt, no slicer import.
"""
from __future__ import annotations

import collections
import enum
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

IS_WINDOWS = sys.platform.startswith("win")

EventCallback = Callable[[dict], None]
PROGRESS_FLAGS = ("--progress-json", "--json-lines")  # the CLI's JSON-lines switch (and its older alias)


class JobState(str, enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class JobResult:
    """What a finished job left behind."""
    state: JobState
    returncode: int | None
    events: list[dict] = field(default_factory=list)
    stderr_tail: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.state == JobState.SUCCEEDED

    @property
    def last(self) -> dict | None:
        return self.events[-1] if self.events else None

    def outputs(self) -> dict:
        """Fields of the ``done`` event (output paths, final metrics), or {}."""
        done = [e for e in self.events if e.get("event") == "done"]
        return dict(done[-1]) if done else {}

    def checkpoints(self) -> list[str]:
        return [e["path"] for e in self.events if e.get("event") == "checkpoint" and "path" in e]


def python_executable() -> str:
    """The Python that runs jobs: Slicer's ``PythonSlicer`` inside the app, else this interpreter."""
    slicer = sys.modules.get("slicer")
    if slicer is not None and getattr(slicer, "app", None) is not None:
        name = "PythonSlicer.exe" if IS_WINDOWS else "PythonSlicer"
        launcher = Path(slicer.app.slicerHome) / "bin" / name
        if launcher.is_file():
            return str(launcher)
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


def cli_command(command: str, *args: str, python: str | None = None) -> list[str]:
    """Argument vector for ``medgmae <command> ... --progress-json`` run with Slicer's Python."""
    argv = [python or python_executable(), "-u", "-m", "medgmae_core.cli", command, *map(str, args)]
    if not any(flag in argv for flag in PROGRESS_FLAGS):
        argv.append("--progress-json")
    return argv


class BackgroundJob:
    """One child process whose stdout carries JSON progress lines.

    Callbacks run in the thread that calls :meth:`poll` (the GUI thread in Slicer):
    ``on_event(record)`` for every JSON record, ``on_progress(fraction, record)`` for
    ``progress`` records, ``on_log(line)`` for non-JSON stdout lines and
    ``on_finished(result)`` once.
    """

    def __init__(self, argv: Sequence[str], *, cwd: str | os.PathLike | None = None,
                 env: dict[str, str] | None = None, name: str = "job",
                 on_event: EventCallback | None = None,
                 on_progress: Callable[[float, dict], None] | None = None,
                 on_log: Callable[[str], None] | None = None,
                 on_finished: Callable[[JobResult], None] | None = None,
                 stderr_lines: int = 40) -> None:
        if not argv:
            raise ValueError("BackgroundJob: argv is empty")
        self.argv = [str(a) for a in argv]
        self.cwd = str(cwd) if cwd is not None else None
        self.env = env
        self.name = name
        self.on_event, self.on_progress, self.on_log, self.on_finished = on_event, on_progress, on_log, on_finished
        self.events: list[dict] = []
        self.log_lines: collections.deque[str] = collections.deque(maxlen=200)
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=stderr_lines)
        self.state = JobState.IDLE
        self.result: JobResult | None = None
        self._process: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._readers: list[threading.Thread] = []
        self._cancel_requested = False
        self._started_at = 0.0
        self._exited_at: float | None = None

    # ------------------------------------------------------------------ start
    @classmethod
    def cli(cls, command: str, *args: str, python: str | None = None, **kwargs: Any) -> "BackgroundJob":
        kwargs.setdefault("name", command)
        return cls(cli_command(command, *args, python=python), **kwargs)

    def start(self) -> "BackgroundJob":
        if self.state == JobState.RUNNING:
            raise RuntimeError(f"{self.name}: already running (pid {self.pid})")
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        popen_kwargs: dict[str, Any] = {}
        if IS_WINDOWS:
            popen_kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            popen_kwargs["start_new_session"] = True  # own session and process group: pgid == pid
        try:
            self._process = subprocess.Popen(
                self.argv, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace", bufsize=1, **popen_kwargs)
        except OSError as exc:
            raise RuntimeError(f"{self.name}: cannot start {self.argv[0]!r}: {exc}") from exc
        self.state = JobState.RUNNING
        self._started_at = time.monotonic()
        self._readers = [
            threading.Thread(target=self._read, args=("out", self._process.stdout), daemon=True),
            threading.Thread(target=self._read, args=("err", self._process.stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        return self

    def _read(self, stream_name: str, stream) -> None:
        for line in iter(stream.readline, ""):
            self._queue.put((stream_name, line.rstrip("\r\n")))
        stream.close()
        self._queue.put((stream_name, None))  # end of stream

    # ---------------------------------------------------------------- polling
    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def is_running(self) -> bool:
        return self.state == JobState.RUNNING

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._started_at if self._started_at else 0.0

    def poll(self) -> list[dict]:
        """Drain pending output without blocking; dispatch callbacks; detect the end. Returns new records."""
        new: list[dict] = []
        while True:
            try:
                stream_name, line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                continue
            if stream_name == "err":
                self.stderr_tail.append(line)
                continue
            record = _parse_record(line)
            if record is None:
                self.log_lines.append(line)
                if self.on_log:
                    self.on_log(line)
                continue
            self.events.append(record)
            new.append(record)
            if self.on_event:
                self.on_event(record)
            if self.on_progress and record.get("event") == "progress":
                self.on_progress(progress_fraction(record), record)
        if self.state == JobState.RUNNING and self._process is not None and self._process.poll() is not None:
            self._exited_at = self._exited_at or time.monotonic()
            # Readers end at EOF; a leftover grandchild holding the pipes must not keep the job open forever.
            drained = not any(t.is_alive() for t in self._readers) and self._queue.empty()
            if drained or time.monotonic() - self._exited_at > 2.0:
                self._finish()
        return new

    def _finish(self) -> None:
        rc = self._process.returncode
        if self._cancel_requested:
            state, error = JobState.CANCELLED, "cancelled by user"
        elif rc == 0 and not any(e.get("event") == "error" for e in self.events):
            state, error = JobState.SUCCEEDED, ""
        else:
            state, error = JobState.FAILED, self._describe_failure(rc)
        self.state = state
        self.result = JobResult(state, rc, list(self.events), list(self.stderr_tail), error)
        if self.on_finished:
            self.on_finished(self.result)

    def _describe_failure(self, rc: int | None) -> str:
        errors = [e.get("message", "") for e in self.events if e.get("event") == "error"]
        head = f"{self.name} failed (exit code {rc})"
        if errors and errors[-1]:
            head += f": {errors[-1]}"
        tail = "\n".join(list(self.stderr_tail)[-12:])
        return head + (f"\nlast error output:\n{tail}" if tail else "")

    def wait_for_completion(self, timeout: float | None = None, interval: float = 0.05) -> JobResult:
        """Block until the job ends (batch scripts). On timeout the job is cancelled and TimeoutError raised."""
        if self.state == JobState.IDLE:
            self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.result is None:
            self.poll()
            if self.result is not None:
                break
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"{self.name}: no result after {timeout:.0f} s; job cancelled")
            time.sleep(interval)
        return self.result

    # ----------------------------------------------------------------- cancel
    def cancel(self, grace: float = 3.0) -> JobResult | None:
        """Kill the whole process tree (child, grandchildren, anything that left the group)."""
        if self._process is None or self.state != JobState.RUNNING:
            return self.result
        self._cancel_requested = True
        kill_process_tree(self._process, grace=grace)
        deadline = time.monotonic() + 10.0
        while self.result is None and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.02)
        return self.result


def _parse_record(line: str) -> dict | None:
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and "event" in record else None


def progress_fraction(record: dict) -> float:
    """Fraction done in [0, 1] from a progress record (``step`` / ``total``)."""
    try:
        total = float(record.get("total") or 0)
        return min(max(float(record.get("step", 0)) / total, 0.0), 1.0) if total > 0 else 0.0
    except (TypeError, ValueError):
        return 0.0


# ---------------------------------------------------------------- process trees
def descendant_pids(pid: int) -> list[int]:
    """All live descendants of ``pid`` (children first), found from the OS process table."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for child, parent in _process_table():
        children[parent].append(child)
    found, frontier = [], [pid]
    while frontier:
        nxt = []
        for p in frontier:
            for c in children.get(p, []):
                if c not in found:
                    found.append(c)
                    nxt.append(c)
        frontier = nxt
    return found


def _process_table() -> list[tuple[int, int]]:
    """(pid, ppid) pairs: /proc on Linux, ``ps`` on macOS, empty elsewhere."""
    table = []
    proc = Path("/proc")
    if proc.is_dir() and (proc / "self" / "stat").exists():
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "
            table.append((int(entry.name), int(fields[1])))
        return table
    if not IS_WINDOWS and shutil.which("ps"):
        out = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
        for row in out.splitlines():
            parts = row.split()
            if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                table.append((int(parts[0]), int(parts[1])))
    return table


def pid_alive(pid: int) -> bool:
    """True if ``pid`` is a running (non-zombie) process."""
    if IS_WINDOWS:
        out = subprocess.run(["tasklist", "/FI", f"PID eq {pid}", "/NH"], capture_output=True, text=True).stdout
        return str(pid) in out
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.parent.is_dir() and Path("/proc/self/stat").exists():
        try:
            text = stat.read_text()
        except OSError:
            return False
        return text[text.rfind(")") + 2:].split()[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_process_tree(process: subprocess.Popen, grace: float = 3.0) -> None:
    """Terminate ``process`` and every descendant; SIGKILL whatever is left after ``grace`` seconds."""
    if IS_WINDOWS:
        subprocess.run(["taskkill", "/PID", str(process.pid), "/T", "/F"], capture_output=True)
        process.wait(timeout=max(grace, 1.0))
        return
    stragglers = descendant_pids(process.pid)  # also those that called setsid and left the group
    _signal_tree(process.pid, stragglers, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    stragglers += [p for p in descendant_pids(process.pid) if p not in stragglers]
    _signal_tree(process.pid, stragglers, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + grace
    while any(pid_alive(p) for p in stragglers) and time.monotonic() < deadline:
        time.sleep(0.02)


def _signal_tree(pgid: int, pids: list[int], sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
