"""Apply turns into Cancel and back, the bar follows progress, errors and cancels are shown (fake widgets);
Cancel returns at once and the panel finishes when the process tree is gone."""
from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedGMAESlicer"))

from MedGMAESlicerLib.jobpanel import JobPanel, format_record  # noqa: E402
from MedGMAESlicerLib.jobs import BackgroundJob  # noqa: E402


class FakeButton:
    def __init__(self, text):
        self.text, self.enabled = text, True


class FakeBar:
    def __init__(self):
        self.value, self.visible, self.history = 0, False, []

    def setValue(self, v):
        self.value = v
        self.history.append(v)


class FakeLabel:
    def __init__(self):
        self.text = ""


def _panel(tmp_path, body, **kw):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(body))
    button, bar, label = FakeButton("Start training"), FakeBar(), FakeLabel()
    panel = JobPanel(button, bar, label, lambda: BackgroundJob([sys.executable, str(script)], name="pretrain"),
                     idle_text="Start training", title="training", **kw)
    return panel, button, bar, label


def _pump(panel, seconds=30):
    end = time.monotonic() + seconds
    while panel.running and time.monotonic() < end:
        panel.poll()
        time.sleep(0.02)


def test_success_cycle(tmp_path):
    states = []
    panel, button, bar, label = _panel(tmp_path, """
        import json
        for s in range(1, 5):
            print(json.dumps({"event": "progress", "step": s, "total": 4, "loss": 1.0 / s}), flush=True)
        print(json.dumps({"event": "done", "checkpoint": "final.pt"}), flush=True)
    """, on_finished=lambda result: f"done: {result.outputs()['checkpoint']}", on_state_changed=states.append)
    panel.toggle()
    assert button.text == "Cancel" and bar.visible and states == [True]
    _pump(panel)
    assert button.text == "Start training"
    assert bar.history == [0, 25, 50, 75, 100, 100]
    assert bar.value == 100 and label.text == "done: final.pt" and states == [True, False]


def test_cancel_cycle_reports_last_checkpoint(tmp_path):
    panel, button, bar, label = _panel(tmp_path, """
        import json, time
        print(json.dumps({"event": "checkpoint", "step": 10, "path": "step_10.pt"}), flush=True)
        time.sleep(60)
    """)
    panel.toggle()
    end = time.monotonic() + 20
    while not panel.job.events and time.monotonic() < end:
        panel.poll()
        time.sleep(0.02)
    assert "step_10.pt" in label.text
    t0 = time.monotonic()
    panel.toggle()  # the Cancel click: returns at once, the button waits for the tree to go
    assert time.monotonic() - t0 < 0.5
    if panel.running:
        assert button.text == "Cancelling..." and not button.enabled and label.text == "Cancelling training..."
    _pump(panel)
    assert button.text == "Start training" and button.enabled and not panel.running
    assert label.text == "Cancelled. Last checkpoint: step_10.pt"


def test_failure_shows_error_and_start_error_stays_idle(tmp_path):
    panel, button, bar, label = _panel(tmp_path, """
        raise SystemExit("no CT volumes in /data")
    """)
    panel.toggle()
    _pump(panel)
    assert button.text == "Start training" and "no CT volumes in /data" in label.text and not bar.visible

    def bad_start():
        raise FileNotFoundError("training data folder /nope does not exist")
    idle = JobPanel(FakeButton("Go"), FakeBar(), FakeLabel(), bad_start, idle_text="Go")
    idle.toggle()
    assert idle.button.text == "Go" and "does not exist" in idle.status_label.text and idle.job is None


def test_format_record():
    text = format_record({"event": "progress", "step": 40, "total": 200, "loss": 0.012345, "lr": 1e-4, "time": 3.0})
    assert text == "step 40 of 200 · loss 0.01235 · lr 0.0001"


def test_a_failing_result_loader_is_reported_not_raised(tmp_path):
    def load(result):
        raise FileNotFoundError("no reconstruction.nii.gz in /out")
    panel, button, bar, label = _panel(tmp_path, """
        import json
        print(json.dumps({"event": "done"}), flush=True)
    """, on_finished=load)
    panel.toggle()
    _pump(panel)
    assert not panel.running and button.text == "Start training"
    assert label.text == "Finished, but the results could not be loaded: no reconstruction.nii.gz in /out"


def test_a_declined_start_stays_idle():
    """The starter returns None when it could not start (dependencies missing: it said why)."""
    label = FakeLabel()
    label.text = "MedGMAE needs Python packages..."
    panel = JobPanel(FakeButton("Go"), FakeBar(), label, lambda: None, idle_text="Go")
    panel.toggle()
    assert panel.job is None and not panel.running and panel.button.text == "Go"
    assert label.text == "MedGMAE needs Python packages..."


def test_default_success_message_names_the_checkpoint(tmp_path):
    panel, button, bar, label = _panel(tmp_path, """
        import json
        print(json.dumps({"event": "done", "checkpoint": "runs/last.pt"}), flush=True)
    """)
    panel.toggle()
    _pump(panel)
    assert label.text.startswith("Training finished in") and label.text.endswith("Checkpoint: runs/last.pt")
