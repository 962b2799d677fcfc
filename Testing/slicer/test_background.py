"""Train and Reconstruct panels: command lines, a real background pre-training run (cancel, resume), result loading."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from MedGMAESlicerLib.jobs import JobState, pid_alive
from MedGMAESlicerLib.logic import MedGMAELogic, array_ijk
from MedGMAESlicerLib.parameters import MedGMAEParameters


def test_training_commands(tmp_path):
    logic = MedGMAELogic(scene=object())
    argv = logic.training_command(data_folder=tmp_path, out_dir=tmp_path / "run", config="base", steps=50,
                                  device="cpu", resume=True)
    assert argv == ["pretrain", "--data", str(tmp_path), "--model", "base", "--steps", "50", "--device", "cpu",
                    "--out", str(tmp_path / "run"), "--progress-json", "--resume", "auto"]
    ft = logic.training_command(command="finetune", data_folder=tmp_path, out_dir=tmp_path, steps=5, device="auto",
                                pretrained=tmp_path / "enc.pt")
    assert ft[:2] == ["finetune", "--data"] and "--progress-json" in ft and ft[-2:] == ["--encoder", str(tmp_path / "enc.pt")]
    assert ft[ft.index("--device") + 1] == "auto"  # pretrain/finetune resolve it (no torch import in Slicer's GUI)
    # one flag vocabulary for both commands (medgmae_core/commands/options.py)
    assert ft[ft.index("--model") + 1] == "tiny" and ft[ft.index("--out") + 1] == str(tmp_path)
    resumed = logic.training_command(command="finetune", data_folder=tmp_path, out_dir=tmp_path, resume=True)
    assert resumed[resumed.index("--resume") + 1] == "auto" and "--config" not in resumed
    with pytest.raises(FileNotFoundError, match="training data folder /no/such/dir does not exist"):
        logic.training_command(data_folder="/no/such/dir", out_dir=tmp_path)
    with pytest.raises(ValueError, match="training output folder"):
        logic.training_command(data_folder=tmp_path, out_dir=Path())
    with pytest.raises(ValueError, match="training data: choose a folder"):
        logic.training_command(data_folder="", out_dir=tmp_path)
    with pytest.raises(ValueError, match="parameter trainConfig"):
        logic.training_command(data_folder=tmp_path, out_dir=tmp_path, config="huge")


def test_reconstruction_command(tmp_path):
    logic = MedGMAELogic(scene=object())
    ct = tmp_path / "ct.nii.gz"
    ct.write_bytes(b"x")
    argv = logic.reconstruction_command(out_dir=tmp_path / "out", input_path=ct, views=30, init="medgmae",
                                        iterations=10, checkpoint=tmp_path / "m.pt", device="cpu")
    assert argv == ["reconstruct", str(ct), "--out", str(tmp_path / "out"), "--init", "medgmae", "--iters", "10",
                    "--device", "cpu", "--geometry", "parallel", "--views", "30", "--checkpoint", str(tmp_path / "m.pt")]
    with pytest.raises(FileNotFoundError, match="projection file /nope.h5 does not exist"):
        logic.reconstruction_command(out_dir=tmp_path, source="projections", input_path="/nope.h5")


def test_reconstruction_result_loading(session, tmp_path):
    """A finished run's folder (as ``medgmae reconstruct`` writes it) becomes a volume node and a PSNR chart."""
    from medgmae_core.export.nifti import write_volume

    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    volume = np.random.default_rng(0).normal(size=(12, 10, 8)).astype(np.float32)
    write_volume(tmp_path / "reconstruction.nii.gz", volume, affine)
    history = [{"iteration": i, "loss": 1.0 / (i + 1), "psnr": 20.0 + i} for i in (0, 5, 10)] + [{"iteration": 11, "loss": 0.1}]
    (tmp_path / "metrics.json").write_text(json.dumps({"psnr": 30.5, "history": history}))
    logic = MedGMAELogic(session.scene)
    text = logic.load_reconstruction_result(tmp_path)
    assert text.startswith("The reconstruction is shown in the slice views") and "PSNR" in text
    assert text.endswith("Its PSNR against the reference is 30.50 dB.")
    rec = logic.last_reconstruction
    assert np.allclose(array_ijk(rec.volume_node), volume)
    assert rec.psnr_table.GetNumberOfRows() == 3
    assert [rec.psnr_table.GetTable().GetValueByName(r, "PSNR (dB)").ToDouble() for r in range(3)] == [20.0, 25.0, 30.0]
    assert rec.chart.GetNumberOfPlotSeriesNodes() == 1
    with pytest.raises(FileNotFoundError, match="no reconstruction.nii.gz"):
        logic.load_reconstruction_result(tmp_path / "empty")


@pytest.mark.slow
def test_real_pretraining_in_background_cancel_and_resume(tmp_path, monkeypatch):
    """``medgmae pretrain`` on a generated phantom as the panel runs it: progress arrives, Cancel ends the whole
    tree, the last checkpoint stays usable, and Resume continues from it."""
    from medgmae_core.train.checkpoint import load_checkpoint

    monkeypatch.setenv("MEDGMAE_RENDER_BACKEND", "torch")  # no numba JIT warm-up in a short test
    logic = MedGMAELogic(scene=object())
    tiny = ["--img-size", "24", "--phantom-shape", "40,40,32", "--batch-size", "1", "--checkpoint-every", "1"]
    job = logic.start_training(data_folder="phantom:1", out_dir=tmp_path, steps=200, device="cpu", extra_args=tiny)
    deadline = time.monotonic() + 240
    while not any(e.get("event") == "checkpoint" for e in job.events) and job.is_running and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.1)
    assert job.is_running, job.result and job.result.error
    progress = [e["step"] for e in job.events if e["event"] == "progress"]
    assert progress and progress == sorted(progress) and all(isinstance(e.get("loss"), float)
                                                             for e in job.events if e["event"] == "progress")
    pid = job.pid
    result = job.cancel(wait=True)  # SIGTERM: pretrain saves last.pt and exits
    assert result.state == JobState.CANCELLED and not pid_alive(pid)
    seen = load_checkpoint(result.checkpoints()[-1])["step"]  # a checkpoint the panel reported: usable
    step = load_checkpoint(tmp_path / "last.pt")["step"]  # what --resume auto continues from (also written on SIGTERM)
    assert step >= seen >= 1
    resumed = logic.start_training(data_folder="phantom:1", out_dir=tmp_path, steps=step + 1, device="cpu",
                                   resume=True, extra_args=tiny).wait_for_completion(timeout=240)
    assert resumed.ok, resumed.error
    start = next(e for e in resumed.events if e["event"] == "start")
    assert start["resumed_from"] == step or start.get("start_step") == step
    assert [e["step"] for e in resumed.events if e["event"] == "progress"] == [step + 1]


def test_parameters_drive_the_panels(session, tmp_path):
    """The panel path: parameters -> command line for training, CT written for a simulated reconstruction."""
    from MedGMAESlicerLib.logic import add_volume

    vol = add_volume(session.scene, np.full((8, 8, 8), 40.0, np.float32), np.eye(4), "ct")
    logic = MedGMAELogic(session.scene)
    params = MedGMAEParameters(inputVolume=vol, trainDataFolder=tmp_path, trainOutputFolder=tmp_path / "t",
                               trainSteps=7, reconOutputFolder=tmp_path / "r", reconIterations=3, reconInit="fbp")
    job = logic.start_training_from_parameters(params, start=False)
    assert job.argv[job.argv.index("--steps") + 1] == "7" and job.argv[2:4] == ["-m", "medgmae_core.cli"]
    job = logic.start_reconstruction_from_parameters(params, start=False)
    written = Path(job.argv[5])
    assert written == tmp_path / "r" / "input_ct.nii.gz" and written.is_file()
    assert job.argv[job.argv.index("--init") + 1] == "fbp" and "--checkpoint" not in job.argv
    assert sys.executable == job.argv[0]


def test_each_panel_owns_its_inputs(session, tmp_path, monkeypatch):
    """Reconstruct uses its own device and checkpoint, fine-tuning its own encoder; nothing comes from Predict's
    checkpoint or from the Train panel's device."""
    from MedGMAESlicerLib.logic import add_volume
    from MedGMAESlicerLib.parameters import Device

    from MedGMAESlicerLib import background

    vol = add_volume(session.scene, np.full((8, 8, 8), 40.0, np.float32), np.eye(4), "ct")
    logic = MedGMAELogic(session.scene)
    # "cuda" is checked against torch.cuda where it is asked for; this machine has none
    monkeypatch.setattr(background, "resolve_device", lambda device="auto": "cpu" if device == "auto" else device)
    predict_ckpt, recon_ckpt, encoder = tmp_path / "predict.pt", tmp_path / "recon.pt", tmp_path / "encoder.pt"
    params = MedGMAEParameters(inputVolume=vol, checkpointPath=str(predict_ckpt), trainDataFolder=str(tmp_path),
                               trainOutputFolder=str(tmp_path / "t"), trainCommand="finetune", trainDevice="cuda",
                               finetuneEncoderPath=str(encoder), reconOutputFolder=str(tmp_path / "r"),
                               reconCheckpointPath=str(recon_ckpt), reconDevice=Device.CPU)
    train = logic.start_training_from_parameters(params, start=False)
    recon = logic.start_reconstruction_from_parameters(params, start=False)
    assert train.argv[train.argv.index("--encoder") + 1] == str(encoder) and str(predict_ckpt) not in train.argv
    assert train.argv[train.argv.index("--device") + 1] == "cuda"
    assert recon.argv[recon.argv.index("--checkpoint") + 1] == str(recon_ckpt) and str(predict_ckpt) not in recon.argv
    assert recon.argv[recon.argv.index("--device") + 1] == "cpu"
    # empty: fine-tuning trains from scratch, reconstruction uses the bundled demo weights (the CLI's default)
    params = MedGMAEParameters(**{**vars(params), "finetuneEncoderPath": "", "reconCheckpointPath": ""})
    assert "--encoder" not in logic.start_training_from_parameters(params, start=False).argv
    assert "--checkpoint" not in logic.start_reconstruction_from_parameters(params, start=False).argv


@pytest.mark.slow
def test_real_reconstruction_in_background(session, small_real_ct, tmp_path, monkeypatch):
    """``medgmae reconstruct`` from the loaded CT as the panel runs it; the result comes back as nodes."""
    monkeypatch.setenv("MEDGMAE_RENDER_BACKEND", "torch")
    ct = session.load_volume(small_real_ct)
    logic = MedGMAELogic(session.scene)
    source = logic.write_input_ct(ct, tmp_path / "input_ct.nii.gz")
    job = logic.start_reconstruction(out_dir=tmp_path, input_path=source, init="fbp", iterations=4, views=12,
                                     device="cpu", extra_args=["--crop", "30:78,30:78,8:24", "--num-gaussians", "300",
                                                               "--eval-every", "2"])
    result = job.wait_for_completion(timeout=300)
    assert result.ok, result.error
    steps = [e["step"] for e in result.events if e["event"] == "progress"]
    assert steps == sorted(steps) and steps[-1] == 4
    text = logic.load_reconstruction_result(result)
    assert f"PSNR against the reference is {result.outputs()['psnr']:.2f} dB" in text
    rec = logic.last_reconstruction
    assert array_ijk(rec.volume_node).shape == (48, 48, 16)
    assert rec.psnr_table.GetNumberOfRows() == len([e for e in result.events if "psnr" in e and e["event"] == "progress"])
