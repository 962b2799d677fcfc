"""Background processes for long jobs (pre-train, fine-tune, reconstruct), never in Slicer's GUI thread.

A :class:`BackgroundJob` starts ``python -m medgmae_core.cli <command> ... --progress-json`` (or the module's
prediction worker) in its own process group (POSIX session / Windows process group, without a console window, as
``slicer.util.launchConsoleProcess`` does with ``STARTUPINFO``), reads the JSON progress lines of
``medgmae_core.progress`` on reader threads, and hands them out through :meth:`BackgroundJob.poll`, which the
widget calls from a ``qt.QTimer`` and tests call directly.

:meth:`BackgroundJob.cancel` returns at once: it asks the whole process tree to stop (SIGTERM / CTRL_BREAK, so
``medgmae pretrain`` saves ``last.pt``), and :meth:`poll` kills what is left after a grace period (SIGKILL /
``taskkill /T /F`` started without waiting). ``cancel(wait=True)`` and :meth:`wait_for_completion` are the
blocking paths for batch scripts. The child finds ``medgmae_core`` and ``MedGMAESlicerLib`` wherever this process
found them (the extension's bundled copy included) through ``PYTHONPATH``. Pure Python: no Qt, no slicer import.
"""
from __future__ import annotations

import collections
import enum
import importlib.util
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


def module_search_paths() -> list[str]:
    """Folders a child process needs on ``sys.path``: the one holding ``medgmae_core`` (the extension's
    bundled copy, or a source checkout) and the one holding ``MedGMAESlicerLib``. Finding the package's spec
    does not import it (nor torch)."""
    paths = []
    spec = importlib.util.find_spec("medgmae_core")
    if spec is not None and spec.submodule_search_locations:
        paths.append(str(Path(list(spec.submodule_search_locations)[0]).resolve().parent))
    module_dir = str(Path(__file__).resolve().parents[1])
    if module_dir not in paths:
        paths.append(module_dir)
    return paths


def job_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: ``base`` (default ``os.environ``) with :func:`module_search_paths` first on
    ``PYTHONPATH`` and unbuffered output."""
    env = dict(os.environ if base is None else base)
    existing = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(module_search_paths() + existing))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def popen_platform_kwargs(windows: bool = IS_WINDOWS, sp=subprocess) -> dict[str, Any]:
    """Own process group, and on Windows no console window.

    Windows: a hidden console (``STARTUPINFO`` with ``STARTF_USESHOWWINDOW`` and ``wShowWindow = SW_HIDE``, as
    ``slicer.util.launchConsoleProcess`` does in Base/Python/slicer/util.py) in a new process group, so
    ``CTRL_BREAK_EVENT`` reaches the job and nothing flashes on screen. POSIX: a new session (pgid == pid).
    """
    if windows:
        info = sp.STARTUPINFO()
        info.dwFlags |= sp.STARTF_USESHOWWINDOW
        info.wShowWindow = 0  # SW_HIDE
        return {"startupinfo": info, "creationflags": sp.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


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
                 stderr_lines: int = 40, cancel_grace: float = 15.0) -> None:
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
        self.context: Any = None  # what the starter needs when the job ends
        self._process: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._readers: list[threading.Thread] = []
        self._cancel_requested = False
        self._kill_at: float | None = None  # when a requested stop becomes a kill
        self._killed = False
        self._tree: list[int] = []  # descendants seen when cancel was requested
        self.cancel_grace = cancel_grace
        self._started_at = 0.0
        self._exited_at: float | None = None

    # ------------------------------------------------------------------ start
    @classmethod
    def cli(cls, command: str, *args: str, python: str | None = None, **kwargs: Any) -> "BackgroundJob":
        kwargs.setdefault("name", command)
        return cls(cli_command(command, *args, python=python), **kwargs)

    @classmethod
    def module(cls, module: str, *args: str, python: str | None = None, **kwargs: Any) -> "BackgroundJob":
        """``python -u -m <module> args...`` with Slicer's Python (e.g. the prediction worker)."""
        kwargs.setdefault("name", module)
        return cls([python or python_executable(), "-u", "-m", module, *map(str, args)], **kwargs)

    def start(self) -> "BackgroundJob":
        if self.state == JobState.RUNNING:
            raise RuntimeError(f"{self.name}: already running (pid {self.pid})")
        env = job_environment(self.env)
        popen_kwargs = popen_platform_kwargs()
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
    def is_cancelling(self) -> bool:
        """Cancel was asked for and the process has not ended yet."""
        return self._cancel_requested and self.state == JobState.RUNNING

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
        if self.is_cancelling and not self._killed and self._process is not None and self._process.poll() is None \
                and time.monotonic() >= (self._kill_at or 0.0):
            self._force_kill()  # the grace period is over: kill what is left, without waiting
        if self.state == JobState.RUNNING and self._process is not None and self._process.poll() is not None:
            self._exited_at = self._exited_at or time.monotonic()
            # Readers end at EOF; a leftover grandchild holding the pipes must not keep the job open forever.
            drained = not any(t.is_alive() for t in self._readers) and self._queue.empty()
            if drained or time.monotonic() - self._exited_at > 2.0:
                self._finish()
        return new

    def _finish(self) -> None:
        if self._cancel_requested and not IS_WINDOWS:
            _signal_pids([p for p in self._tree if pid_alive(p)], signal.SIGKILL)  # stragglers that left the group
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
                self.cancel(grace=3.0, wait=True)
                raise TimeoutError(f"{self.name}: no result after {timeout:.0f} s; job cancelled")
            time.sleep(interval)
        return self.result

    # ----------------------------------------------------------------- cancel
    def cancel(self, grace: float | None = None, *, wait: bool = False) -> JobResult | None:
        """Stop the whole process tree (child, grandchildren, anything that left the group).

        Returns at once (the GUI path): the tree is asked to stop, and :meth:`poll` kills what is still running
        ``grace`` seconds later (default :attr:`cancel_grace`). ``wait=True`` blocks until the job has ended and
        returns its result (batch scripts, tests).
        """
        if self._process is None or self.state != JobState.RUNNING:
            return self.result
        if not self._cancel_requested:
            self._cancel_requested = True
            self._kill_at = time.monotonic() + (self.cancel_grace if grace is None else grace)
            self._tree = [] if IS_WINDOWS else descendant_pids(self._process.pid)
            request_stop(self._process, self._tree)
        elif grace is not None:
            self._kill_at = min(self._kill_at or float("inf"), time.monotonic() + grace)
        if wait:
            deadline = (self._kill_at or time.monotonic()) + 10.0
            while self.result is None and time.monotonic() < deadline:
                self.poll()
                time.sleep(0.02)
        return self.result

    def _force_kill(self) -> None:
        self._killed = True
        if IS_WINDOWS:
            force_kill_windows(self._process.pid)
            return
        self._tree += [p for p in descendant_pids(self._process.pid) if p not in self._tree]
        _signal_tree(self._process.pid, self._tree, signal.SIGKILL)


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


def request_stop(process: subprocess.Popen, tree: list[int]) -> None:
    """Ask a job to stop without waiting: SIGTERM to its process group and every known descendant (POSIX), or
    CTRL_BREAK_EVENT to its process group (Windows; the job was started with CREATE_NEW_PROCESS_GROUP)."""
    if IS_WINDOWS:
        try:
            os.kill(process.pid, signal.CTRL_BREAK_EVENT)
        except OSError:
            force_kill_windows(process.pid)
        return
    _signal_tree(process.pid, tree, signal.SIGTERM)


def force_kill_windows(pid: int, sp=subprocess) -> Any:
    """``taskkill /PID pid /T /F`` started in the background (no console window, not waited for)."""
    return sp.Popen(["taskkill", "/PID", str(pid), "/T", "/F"], stdin=sp.DEVNULL, stdout=sp.DEVNULL,
                    stderr=sp.DEVNULL, **popen_platform_kwargs(True, sp))


def _signal_tree(pgid: int, pids: list[int], sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    _signal_pids(pids, sig)


def _signal_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
