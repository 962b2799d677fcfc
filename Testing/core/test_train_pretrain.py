"""``medgmae pretrain``: settings, exact resume, JSON progress and SIGTERM in a real process, DDP, learning."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from medgmae_core import cli
from medgmae_core.commands import pretrain as pretrain_command
from medgmae_core.train import settings as pretrain_settings
from medgmae_core.train.checkpoint import load_checkpoint, load_model

REPO = Path(__file__).resolve().parents[2]
# A small, fast run: 24^3 phantom crops, 12^3 patches, a 1-block encoder.
TINY = ["--data", "phantom:2", "--phantom-shape", "32,32,24", "--img-size", "24", "--patch-size", "12",
        "--objective", "voxel", "--batch-size", "2", "--crops-per-case", "3", "--lr", "1e-3", "--warmup-steps", "2"]


def _yaml(tmp_path: Path, **settings) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model_overrides": {"depth": 1, "decoder_depth": 1}, **settings}))
    return path


def _run(argv: list[str], capsys=None) -> tuple[int, list[dict]]:
    code = cli.main(["pretrain", *argv])
    events = []
    if capsys is not None:
        out = capsys.readouterr().out
        events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return code, events


def test_settings_yaml_and_flags(tmp_path):
    config = _yaml(tmp_path, data="phantom:3", steps=7, batch_size=4, lr=0.01, img_size=[48, 48, 36])
    parser = cli.build_parser(["pretrain"])
    args = parser.parse_args(["pretrain", "--config", str(config), "--lr", "0.002", "--amp", "bf16"])
    given = pretrain_command.explicit_settings(args)
    assert given["lr"] == 0.002 and given["batch_size"] == 4 and given["amp"] == "bf16"  # flag beats YAML
    cfg = pretrain_settings.validate_settings({**{k: v for k, (v, _) in pretrain_settings.SETTINGS.items()}, **given})
    assert cfg["img_size"] == [48, 48, 36] and cfg["warmup_steps"] == 1 and cfg["steps"] == 7
    model_config = pretrain_settings.build_model_config(cfg)
    assert model_config.img_size == (48, 48, 36) and model_config.depth == 1 and model_config.objective == "gaussian"
    bad = tmp_path / "bad.yaml"
    bad.write_text("batchsize: 3\n")
    with pytest.raises(ValueError, match="unknown settings \\['batchsize'\\]"):
        pretrain_command.explicit_settings(parser.parse_args(["pretrain", "--config", str(bad)]))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        pretrain_settings.validate_settings({**cfg, "batch_size": 0})
    with pytest.raises(ValueError, match="no training data"):
        pretrain_settings.validate_settings({**cfg, "data": None})
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        pretrain_settings.resolve_amp("fp16", torch.device("cpu"))
    assert pretrain_settings.resolve_amp("auto", torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize("name", pretrain_settings.shipped_configs())
def test_shipped_example_configs_are_valid(name):
    assert len(pretrain_settings.shipped_configs()) >= 3
    args = cli.build_parser(["pretrain"]).parse_args(["pretrain", "--config", name, "--data", "phantom:1"])
    given = pretrain_command.explicit_settings(args)
    cfg = pretrain_settings.validate_settings({**{k: v for k, (v, _) in pretrain_settings.SETTINGS.items()}, **given})
    config = pretrain_settings.build_model_config(cfg)
    assert config.img_size == (96, 96, 96) and cfg["data"] == ["phantom:1"]


def test_a_runs_config_yaml_rebuilds_its_model_and_shipped_names_take_the_suffix(tmp_path):
    """``--config RUN/config.yaml`` (settings plus the recorded ``model_config``) rebuilds the run's model."""
    from medgmae_core.train.pretrain import _write_config_yaml
    defaults = {k: v for k, (v, _) in pretrain_settings.SETTINGS.items()}
    cfg = pretrain_settings.validate_settings({**defaults, "data": ["phantom:1"], "model_overrides": {
        "intensity_prior_radius": 0.7, "decoder_depth": 2}})
    model_config = pretrain_settings.build_model_config(cfg)
    _write_config_yaml(pretrain_settings.PretrainSettings.from_dict(cfg), model_config, tmp_path / "config.yaml")
    read = pretrain_settings.load_settings_yaml(tmp_path / "config.yaml")
    assert "model_config" not in read and read["model_overrides"]["intensity_prior_radius"] == 0.7
    rebuilt = pretrain_settings.build_model_config(pretrain_settings.validate_settings({**defaults, **read}))
    assert rebuilt == model_config and rebuilt.decoder_depth == 2
    # explicit model_overrides win over the recorded model
    text = (tmp_path / "config.yaml").read_text() + "model_overrides: {decoder_depth: 3}\n"
    text = text.replace("model_overrides:\n  intensity_prior_radius: 0.7\n  decoder_depth: 2\n", "")
    (tmp_path / "edited.yaml").write_text(text)
    edited = pretrain_settings.load_settings_yaml(tmp_path / "edited.yaml")
    overrides = edited["model_overrides"]
    assert overrides["decoder_depth"] == 3 and overrides["intensity_prior_radius"] == 0.7
    (tmp_path / "bad.yaml").write_text("data: phantom:1\nmodel_config: 3\n")
    with pytest.raises(ValueError, match="bad.yaml: model_config must be a mapping"):
        pretrain_settings.load_settings_yaml(tmp_path / "bad.yaml")
    shipped = pretrain_settings.resolve_config_path("tiny_cpu")
    assert pretrain_settings.resolve_config_path("pretrain_tiny_cpu.yaml") == shipped
    with pytest.raises(FileNotFoundError, match="nothing.yaml.*shipped examples: .*pretrain_tiny_cpu"):
        pretrain_settings.resolve_config_path("nothing.yaml")


def test_user_errors_are_one_line(tmp_path, capsys):
    code = cli.main(["pretrain", "--data", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "data path not found" in err and "missing" in err and "Traceback" not in err
    code = cli.main(["pretrain", *TINY, "--img-size", "30", "--out-dir", str(tmp_path / "o")])
    assert code == 2 and "not divisible by patch_size" in capsys.readouterr().err
    code = cli.main(["pretrain", "--resume", str(tmp_path / "none.pt"), "--out-dir", str(tmp_path / "o")])
    assert code == 2 and "checkpoint not found" in capsys.readouterr().err


def test_resume_equals_uninterrupted_run(tmp_path, capsys):
    config = _yaml(tmp_path)
    full = tmp_path / "full"
    code, events = _run(["--config", str(config), *TINY, "--steps", "4", "--checkpoint-every", "2", "--keep-last", "0",
                         "--out-dir", str(full), "--progress-json"], capsys)
    assert code == 0
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [2, 4]
    # "kill" after step 2: only its checkpoint survives; resume it elsewhere
    part = tmp_path / "part"
    part.mkdir()
    shutil.copy(full / "step_00000002.pt", part / "step_00000002.pt")
    code, events = _run(["--resume", str(part / "step_00000002.pt"), "--progress-json"], capsys)
    assert code == 0
    assert [e["step"] for e in events if e["event"] == "progress"] == [3, 4]
    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(part / "last.pt")
    assert a["step"] == b["step"] == 4
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=1e-6, msg=key)
    torch.testing.assert_close(b["extra"]["history"], a["extra"]["history"], rtol=0, atol=1e-7)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 4
    # one flag vocabulary (commands/options.py): --out names the run folder (the python name out_dir, as
    # train_config stores it; --out-dir above is the hidden old spelling) and a bare --resume is auto; a checkpoint
    # whose train_config has the python names continues exactly
    old_style = load_checkpoint(full / "step_00000002.pt")["train_config"]
    assert {"out_dir", "warmup_steps", "spacing_mm", "img_size"} <= set(old_style) and old_style["warmup_steps"] == 2
    again = tmp_path / "again"
    again.mkdir()
    shutil.copy(full / "step_00000002.pt", again / "last.pt")
    code, events = _run(["--out", str(again), "--resume", "--progress-json"], capsys)
    assert code == 0 and [e["step"] for e in events if e["event"] == "progress"] == [3, 4]
    c = load_checkpoint(again / "last.pt")
    for key, value in a["model"].items():
        torch.testing.assert_close(c["model"][key], value, rtol=0, atol=1e-6, msg=key)
    assert c["train_config"]["out_dir"] == str(again) and c["train_config"]["img_size"] == old_style["img_size"]
    assert "--out-dir" not in cli.build_parser(["pretrain"])._subparsers._group_actions[0].choices["pretrain"].format_help()
    # an existing run is never overwritten by accident
    code = cli.main(["pretrain", "--config", str(config), *TINY, "--steps", "4", "--out-dir", str(full)])
    assert code == 2 and "already holds a run" in capsys.readouterr().err
    # --resume auto on a finished run asks for more steps; with more steps it continues
    code = cli.main(["pretrain", "--resume", "auto", "--out-dir", str(full)])
    assert code == 2 and "raise --steps" in capsys.readouterr().err
    code, events = _run(["--resume", "auto", "--out", str(full), "--steps", "5", "--progress-json"], capsys)
    assert code == 0 and [e["step"] for e in events if e["event"] == "progress"] == [5]
    assert (full / "loss_curve.png").stat().st_size > 1000 and (full / "config.yaml").exists()


def test_progress_json_and_sigterm_in_a_real_process(tmp_path, capsys):
    """A real ``medgmae pretrain --progress-json``: ordered JSON lines; SIGTERM saves a checkpoint and exits."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "medgmae_core.cli", "pretrain", "--config", str(_yaml(tmp_path)), *TINY,
           "--steps", "500", "--checkpoint-every", "1000", "--out-dir", str(out), "--progress-json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    events = []
    try:
        for line in proc.stdout:
            events.append(json.loads(line))
            if sum(e["event"] == "progress" for e in events) == 2:
                proc.send_signal(signal.SIGTERM)
                break
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    events += [json.loads(line) for line in rest.splitlines() if line.strip()]
    assert proc.returncode == 128 + signal.SIGTERM, err
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and "checkpoint" in kinds
    assert all(e["command"] == "pretrain" for e in events)
    steps = [e["step"] for e in events if e["event"] == "progress"]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) < 500
    for e in events:
        if e["event"] == "progress":
            assert {"loss", "lr", "step_time", "samples_per_s"} <= set(e) and e["total"] == 500
    done = events[-1]
    assert done["stopped_by"] == "SIGTERM" and done["step"] == steps[-1]
    assert load_checkpoint(out / "last.pt")["step"] == steps[-1]  # nothing lost
    code, resumed = _run(["--resume", "auto", "--out-dir", str(out), "--steps", str(steps[-1] + 1),
                          "--progress-json"], capsys)
    assert code == 0 and [e["step"] for e in resumed if e["event"] == "progress"] == [steps[-1] + 1]


DDP_WORKER = textwrap.dedent('''
    """Run by torchrun: one DDP step by hand (gradients/params compared across ranks), then the real CLI."""
    import json, sys
    import torch
    import torch.distributed as dist
    from medgmae_core import cli
    from medgmae_core.data.datasets import PretrainCrops, crop_batches, phantom_cases
    from medgmae_core.model import build_model, get_config
    from medgmae_core.train.distributed import init_distributed, resolve_device, wrap_model
    from medgmae_core.train.optim import build_optimizer, clip_gradients

    out_json, cli_args = sys.argv[1], sys.argv[2:]
    device = resolve_device("cpu")
    info = init_distributed(device)
    torch.manual_seed(100 + info.rank)  # different init per rank: DDP must broadcast rank 0's weights
    model = build_model(get_config("tiny", img_size=24, patch_size=12, depth=1, decoder_depth=1, objective="voxel"))
    ddp = wrap_model(model, info, device)
    data = PretrainCrops(phantom_cases(2, shape=(32, 32, 24)), roi_size=24, crops_per_case=1, seed=0)
    batch, _ = next(crop_batches(data, 2, rank=info.rank, world_size=info.world_size))
    optimizer = build_optimizer(ddp, lr=1e-3)
    loss = ddp(batch, generator=torch.Generator().manual_seed(info.rank)).loss
    loss.backward()
    clip_gradients(model.parameters(), 1.0)

    def gather(t):
        parts = [torch.zeros_like(t) for _ in range(info.world_size)]
        dist.all_gather(parts, t.contiguous())
        return parts

    grads = gather(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    optimizer.step()
    params = gather(torch.cat([p.detach().flatten() for p in model.parameters()]))
    losses = gather(loss.detach().reshape(1))
    batch_sums = gather(batch.sum().reshape(1))
    if info.rank == 0:
        json.dump({"world_size": info.world_size, "backend": info.backend,
                   "grad_diff": float((grads[0] - grads[1]).abs().max()),
                   "grad_norm": float(grads[0].norm()),
                   "param_diff": float((params[0] - params[1]).abs().max()),
                   "losses": [float(x) for x in losses], "batch_sums": [float(x) for x in batch_sums]},
                  open(out_json, "w"))
    sys.exit(cli.main(["pretrain", *cli_args]))
''')


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    worker = tmp_path / "ddp_worker.py"
    worker.write_text(DDP_WORKER)
    result, out = tmp_path / "ddp.json", tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
           str(result), "--config", str(_yaml(tmp_path)), *TINY, "--steps", "2", "--checkpoint-every", "1",
           "--out-dir", str(out), "--progress-json", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(result.read_text())
    assert r["world_size"] == 2 and r["backend"] == "gloo"
    assert r["batch_sums"][0] != r["batch_sums"][1]  # each rank read its own shard
    assert r["losses"][0] != r["losses"][1]  # so local losses differ ...
    assert r["grad_norm"] > 0 and r["grad_diff"] == 0.0  # ... but the averaged gradients are identical
    assert r["param_diff"] == 0.0  # and so are the weights after the step
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events].count("start") == 1  # only rank 0 prints
    assert events[0]["world_size"] == 2 and events[-1]["event"] == "done" and events[-1]["step"] == 2
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [1, 2]
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".pt") == ["last.pt", "step_00000001.pt",
                                                                          "step_00000002.pt"]


@pytest.mark.slow
@pytest.mark.parametrize("objective, lr, steps, most", [("gaussian", 3e-4, 20, 0.8), ("voxel", 1e-3, 12, 0.6)])
def test_loss_falls_on_real_ct(objective, lr, steps, most, small_real_ct, tmp_path, capsys):
    """The real pipeline + CLI on a real CT: a held-out evaluation batch's loss falls clearly."""
    from medgmae_core.data.datasets import PretrainCrops, crop_batches, discover_volumes
    from medgmae_core.model import build_model

    out = tmp_path / objective
    code, events = _run(["--data", str(small_real_ct), "--spacing-mm", "3.0", "--img-size", "48",
                         "--objective", objective, "--num-gaussians", "32", "--config", str(_yaml(tmp_path)),
                         "--steps", str(steps), "--lr", str(lr), "--warmup-steps", "2", "--seed", "0",
                         "--checkpoint-every", "1000", "--out-dir", str(out), "--progress-json"], capsys)
    assert code == 0
    trained, config = load_model(out / "last.pt")
    torch.manual_seed(0)
    initial = build_model(config).eval()  # the run's initial weights (same seed)
    held_out = PretrainCrops(discover_volumes(small_real_ct), roi_size=48, spacing_mm=3.0, crops_per_case=4, seed=123)
    batch = next(crop_batches(held_out, 4))[0]

    def evaluate(model):
        with torch.no_grad():
            return float(model(batch, generator=torch.Generator().manual_seed(5)).loss)

    before, after = evaluate(initial), evaluate(trained)
    print(f"{objective}: held-out loss {before:.4f} -> {after:.4f} ({after / before:.2f}x)")
    assert after < most * before, (objective, before, after)  # measured: 0.55x (gaussian), 0.25x (voxel)


def test_medgmae_star_with_bf16_autocast(tmp_path, capsys):
    argv = [a if a != "voxel" else "gaussian_star" for a in TINY]
    code, events = _run(["--config", str(_yaml(tmp_path)), *argv, "--num-gaussians", "8", "--amp", "bf16",
                         "--steps", "1", "--out-dir", str(tmp_path / "star"), "--progress-json"], capsys)
    assert code == 0
    loss = [e["loss"] for e in events if e["event"] == "progress"]
    assert len(loss) == 1 and 0 < loss[0] < 1
    model, config = load_model(tmp_path / "star" / "last.pt")
    assert config.objective == "gaussian_star" and all(p.dtype == torch.float32 for p in model.parameters())


def test_init_from_starts_at_the_parents_weights_and_keeps_its_training_list(tmp_path, capsys):
    config = _yaml(tmp_path)
    parent = tmp_path / "parent"
    assert _run(["--config", str(config), *TINY, "--steps", "2", "--out", str(parent)])[0] == 0
    child = tmp_path / "child"
    assert _run(["--config", str(config), *TINY, "--data", "phantom:3", "--steps", "1", "--lr", "1e-12",
                 "--init-from", str(parent / "last.pt"), "--out", str(child)])[0] == 0
    a, b = load_checkpoint(parent / "last.pt"), load_checkpoint(child / "last.pt")
    assert b["step"] == 1  # a new run, not a resume
    for key, value in a["model"].items():  # lr ~0: the child still holds the parent's weights
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=1e-9, msg=key)
    assert b["extra"]["parent_training_data"] == a["extra"]["training_data"]
    assert set(a["extra"]["training_data"]) <= set(b["extra"]["training_data"])  # zero-shot checks see both
    capsys.readouterr()
    code = cli.main(["pretrain", *TINY, "--objective", "gaussian", "--init-from", str(parent / "last.pt"),
                     "--steps", "1", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code == 2 and "--init-from" in err and "do not fit" in err and "Traceback" not in err


def test_init_from_a_medgmae_checkpoint_starts_medgmae_star_with_fresh_levels(tmp_path):
    config = _yaml(tmp_path, model_overrides={"depth": 1, "decoder_depth": 1, "num_gaussians": 8})
    gaussian = [*TINY, "--objective", "gaussian"]
    assert _run(["--config", str(config), *gaussian, "--steps", "1", "--out", str(tmp_path / "base")])[0] == 0
    star = [*TINY, "--objective", "gaussian_star", "--steps", "1", "--lr", "1e-12"]
    assert _run(["--config", str(config), *star, "--init-from", str(tmp_path / "base" / "last.pt"),
                 "--out", str(tmp_path / "star")])[0] == 0
    base, child = load_checkpoint(tmp_path / "base" / "last.pt"), load_checkpoint(tmp_path / "star" / "last.pt")
    assert any(k.startswith("levels.") for k in child["model"])
    for key, value in base["model"].items():
        torch.testing.assert_close(child["model"][key], value, rtol=0, atol=1e-9, msg=key)


def test_gaussian_preset_with_objective_voxel_builds_the_voxel_control(caplog):
    import yaml

    preset = yaml.safe_load(pretrain_settings.resolve_config_path("pretrain_tiny_cpu").read_text())
    cfg = {**preset, "objective": "voxel", "img_size": [96, 96, 96]}
    with caplog.at_level("WARNING"):
        model_config = pretrain_settings.build_model_config(cfg)
    assert model_config.objective == "voxel"
    assert model_config.intensity_prior_radius == 0 and model_config.intensity_prior_sigma == 0
    assert "intensity_prior_radius, intensity_prior_sigma" in caplog.text
    gaussian = pretrain_settings.build_model_config({**cfg, "objective": "gaussian"})
    assert gaussian.intensity_prior_sigma == 0.25  # the preset itself is unchanged
