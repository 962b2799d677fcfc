"""The background job runner with real child processes: ordered progress, whole-tree cancel, crash reports."""
from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedGMAESlicer"))

from MedGMAESlicerLib.jobs import (BackgroundJob, JobState, cli_command, job_environment, pid_alive,  # noqa: E402
                                   popen_platform_kwargs, progress_fraction)


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def test_progress_lines_arrive_in_order(tmp_path):
    child = _script(tmp_path, "count.py", """
        import json, sys, time
        from medgmae_core.progress import ProgressReporter
        rep = ProgressReporter("count", total=20, json_lines=True)
        rep.start()
        print("plain log line", flush=True)
        for step in range(1, 21):
            rep.progress(step, loss=1.0 / step)
            if step % 10 == 0:
                rep.checkpoint(step, f"ckpt_{step}.pt")
            time.sleep(0.01)
        rep.done(final_loss=0.05)
    """)
    fractions, logs, finished = [], [], []
    job = BackgroundJob([sys.executable, str(child)], name="count",
                        on_progress=lambda f, rec: fractions.append((f, rec["loss"])),
                        on_log=logs.append, on_finished=finished.append)
    job.start()
    seen = []
    deadline = time.monotonic() + 30
    while job.is_running and time.monotonic() < deadline:
        seen += job.poll()  # the non-blocking polling API a qt.QTimer calls
        time.sleep(0.02)
    result = job.result
    assert result is not None and result.state == JobState.SUCCEEDED, result
    steps = [e["step"] for e in seen if e["event"] == "progress"]
    assert steps == list(range(1, 21))
    assert [e["event"] for e in seen][0] == "start" and seen[-1]["event"] == "done"
    assert [f for f, _ in fractions] == [s / 20 for s in range(1, 21)]
    assert fractions[-1][1] == pytest.approx(0.05)
    assert result.checkpoints() == ["ckpt_10.pt", "ckpt_20.pt"]
    assert result.outputs()["final_loss"] == pytest.approx(0.05)
    assert logs == ["plain log line"]
    assert finished == [result]


def test_cancel_kills_whole_tree(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    child = _script(tmp_path, "tree.py", f"""
        import json, subprocess, sys, time
        grand = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        # a second grandchild that leaves the process group, as daemons do
        escaped = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
        open({str(pid_file)!r}, "w").write(f"{{grand.pid}} {{escaped.pid}}")
        print(json.dumps({{"event": "start", "total": 100}}), flush=True)
        for step in range(1, 1000):
            print(json.dumps({{"event": "progress", "step": step, "total": 100}}), flush=True)
            time.sleep(0.05)
    """)
    job = BackgroundJob([sys.executable, str(child)], name="tree").start()
    deadline = time.monotonic() + 30
    while not any(e["event"] == "progress" for e in job.events) and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.02)
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    grand_pids = [int(p) for p in pid_file.read_text().split()]
    pids = [job.pid, *grand_pids]
    assert all(pid_alive(p) for p in pids), "tree not running before cancel"
    result = job.cancel(grace=2.0, wait=True)
    assert result is not None and result.state == JobState.CANCELLED
    end = time.monotonic() + 5
    while any(pid_alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.05)
    assert [p for p in pids if pid_alive(p)] == [], "orphans left after cancel"


def test_crash_reports_last_error_lines(tmp_path):
    child = _script(tmp_path, "crash.py", """
        import json, sys
        print(json.dumps({"event": "start", "total": 3}), flush=True)
        print("warming up", file=sys.stderr, flush=True)
        def load_weights(path):
            raise RuntimeError(f"checkpoint {path} is truncated")
        load_weights("/tmp/model.pt")
    """)
    result = BackgroundJob([sys.executable, str(child)], name="pretrain").wait_for_completion(timeout=30)
    assert result.state == JobState.FAILED and result.returncode == 1
    assert "pretrain failed (exit code 1)" in result.error
    assert "RuntimeError: checkpoint /tmp/model.pt is truncated" in result.error
    assert any("load_weights" in line for line in result.stderr_tail)


def test_error_event_is_a_failure_even_with_exit_code_zero(tmp_path):
    child = _script(tmp_path, "err.py", """
        import json
        print(json.dumps({"event": "error", "message": "no volumes found in /data"}), flush=True)
    """)
    result = BackgroundJob([sys.executable, str(child)], name="finetune").wait_for_completion(timeout=30)
    assert result.state == JobState.FAILED and "no volumes found in /data" in result.error


def test_cli_command_and_fraction():
    argv = cli_command("pretrain", "--steps", 5, python="/py")
    assert argv == ["/py", "-u", "-m", "medgmae_core.cli", "pretrain", "--steps", "5", "--progress-json"]
    assert progress_fraction({"step": 5, "total": 20}) == 0.25
    assert progress_fraction({"step": 5}) == 0.0
    with pytest.raises(RuntimeError, match="cannot start"):
        BackgroundJob(["/nonexistent/python"]).start()


def test_real_cli_error_is_reported(tmp_path):
    """The real ``medgmae`` CLI through the runner: a bad command line is reported with its message."""
    result = BackgroundJob.cli("no-such-command", python=sys.executable).wait_for_completion(timeout=60)
    assert result.state == JobState.FAILED and result.returncode == 2
    assert "invalid choice: 'no-such-command'" in result.error


def test_jobs_run_with_slicers_python(tmp_path, monkeypatch):
    """Inside the app the CLI runs with Slicer's own PythonSlicer launcher; outside, with this interpreter."""
    import types

    from MedGMAESlicerLib.jobs import python_executable
    launcher = tmp_path / "bin" / ("PythonSlicer.exe" if sys.platform.startswith("win") else "PythonSlicer")
    launcher.parent.mkdir()
    launcher.write_text("")
    fake = types.ModuleType("slicer")
    fake.app = types.SimpleNamespace(slicerHome=str(tmp_path))
    monkeypatch.setitem(sys.modules, "slicer", fake)
    assert python_executable() == str(launcher)
    fake.app = None  # slicer-core: no application
    assert python_executable() == sys.executable


def test_cancel_returns_at_once_and_kills_after_the_grace_period(tmp_path):
    """The GUI's Cancel: no waiting in the click. A job that ignores SIGTERM is killed by poll() after the grace
    period; one that honours it (``medgmae pretrain`` saves and exits) ends by itself before."""
    child = _script(tmp_path, "stubborn.py", """
        import json, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(json.dumps({"event": "start", "total": 10}), flush=True)
        time.sleep(120)
    """)
    job = BackgroundJob([sys.executable, str(child)], name="stubborn").start()
    deadline = time.monotonic() + 30
    while not job.events and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.02)
    t0 = time.monotonic()
    assert job.cancel(grace=1.0) is None  # not finished yet: the call did not wait
    assert time.monotonic() - t0 < 0.5 and job.is_cancelling and job.is_running
    time.sleep(0.3)
    job.poll()
    assert job.is_cancelling and pid_alive(job.pid)  # SIGTERM ignored, grace not over: still there
    while job.result is None and time.monotonic() - t0 < 20:
        job.poll()
        time.sleep(0.05)
    assert job.result.state == JobState.CANCELLED and 1.0 <= time.monotonic() - t0 < 15
    assert not pid_alive(job.pid)


def test_windows_jobs_have_no_console_window_and_kill_without_waiting():
    """What ``slicer.util.launchConsoleProcess`` does on Windows (Base/Python/slicer/util.py): STARTUPINFO with
    STARTF_USESHOWWINDOW and SW_HIDE; plus a new process group for CTRL_BREAK. taskkill runs in the background."""
    import types

    from MedGMAESlicerLib import jobs

    class StartupInfo:
        def __init__(self):
            self.dwFlags, self.wShowWindow = 0, 1

    started = []
    fake = types.SimpleNamespace(STARTUPINFO=StartupInfo, STARTF_USESHOWWINDOW=1, CREATE_NEW_PROCESS_GROUP=0x200,
                                 DEVNULL=-3, Popen=lambda argv, **kw: started.append((argv, kw)) or "proc")
    kwargs = popen_platform_kwargs(windows=True, sp=fake)
    assert kwargs["creationflags"] == 0x200 and "start_new_session" not in kwargs
    assert kwargs["startupinfo"].dwFlags & 1 and kwargs["startupinfo"].wShowWindow == 0
    assert jobs.force_kill_windows(4242, sp=fake) == "proc"
    argv, kw = started[0]
    assert argv == ["taskkill", "/PID", "4242", "/T", "/F"] and kw["startupinfo"].wShowWindow == 0
    assert popen_platform_kwargs(windows=False) == {"start_new_session": True}


def test_children_find_the_library_wherever_this_process_found_it(tmp_path):
    """An installed extension bundles medgmae_core next to the module: the job's PYTHONPATH names that folder
    (and the module's), before anything already there."""
    import importlib.util

    env = job_environment({"PYTHONPATH": "/already/there", "X": "1"})
    paths = env["PYTHONPATH"].split(os.pathsep)
    core_parent = str(Path(importlib.util.find_spec("medgmae_core").submodule_search_locations[0]).parent)
    module_dir = str(Path(__file__).resolve().parents[2] / "MedGMAESlicer")
    assert paths == [core_parent, module_dir, "/already/there"] and env["X"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    job = BackgroundJob.module("MedGMAESlicerLib.prediction", "--help", python=sys.executable, cwd=tmp_path)
    done = job.wait_for_completion(timeout=120)  # run from elsewhere: it imports MedGMAESlicerLib via PYTHONPATH
    assert done.returncode == 0 and job.log_lines[0].startswith("usage: MedGMAESlicerLib.prediction"), list(job.log_lines)
