"""Checkpoint format (atomic writes, checked loads, load_model) and optimiser / schedule / clipping."""
from __future__ import annotations

import math
import os
import random

import numpy as np
import pytest
import torch

from medgmae_core.model import get_config, build_model
from medgmae_core.train import checkpoint as ckpt_mod
from medgmae_core.train.checkpoint import (FORMAT, CheckpointError, list_step_checkpoints, load_checkpoint,
                                           load_model, restore_training_state, save_checkpoint,
                                           save_training_checkpoint)
from medgmae_core.train.optim import (WarmupCosine, build_optimizer, build_scheduler, clip_gradients,
                                      no_weight_decay_names)


def _tiny(objective: str = "voxel"):
    torch.manual_seed(0)
    config = get_config("tiny", img_size=24, patch_size=12, depth=1, decoder_depth=1, objective=objective,
                        num_gaussians=4)
    return build_model(config), config


def _state(model=None, step: int = 3):
    model, config = (model, model.config) if model is not None else _tiny()
    opt = build_optimizer(model, lr=1e-3)
    sched = build_scheduler(opt, 2, 10)
    model(torch.rand(1, 1, 24, 24, 24)).loss.backward()
    opt.step()
    sched.step()
    return dict(model=model, optimizer=opt, scheduler=sched, scaler=torch.amp.GradScaler("cpu", enabled=False),
                step=step, config=config, train_config={"lr": 1e-3, "data": "phantom:2"}, extra={"note": "x"})


def test_round_trip_and_load_model(tmp_path):
    state = _state()
    path = save_checkpoint(tmp_path / "a.pt", **state)
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == FORMAT == "medgmae-checkpoint/1"
    assert set(ckpt) == {"format", "model_config", "model", "optimizer", "scheduler", "scaler", "step", "rng",
                         "train_config", "extra"}
    assert ckpt["step"] == 3 and ckpt["train_config"]["data"] == "phantom:2" and ckpt["extra"] == {"note": "x"}
    assert set(ckpt["rng"]) >= {"python", "numpy", "torch"}
    model, config = load_model(path)
    assert config == state["config"] and not model.training
    for k, v in state["model"].state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    # the whole training state comes back
    fresh, _ = _tiny()
    opt = build_optimizer(fresh, lr=1e-3)
    sched = build_scheduler(opt, 2, 10)
    assert restore_training_state(ckpt, model=fresh, optimizer=opt, scheduler=sched) == 3
    assert sched.get_last_lr() == state["scheduler"].get_last_lr()
    assert opt.state_dict()["state"][0]["step"] == state["optimizer"].state_dict()["state"][0]["step"]


def test_rng_states_are_restored(tmp_path):
    path = save_checkpoint(tmp_path / "r.pt", **_state())
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.random(), np.random.rand(), torch.rand(3)  # move every generator on
    ckpt_mod.set_rng_state(load_checkpoint(path)["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_crash_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    state = _state()
    path = save_checkpoint(tmp_path / "last.pt", **state)
    before = path.read_bytes()

    def failing_save(obj, fh, *args, **kwargs):
        fh.write(b"half a checkpoint")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, **{**state, "step": 99})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left behind


def test_keep_last_and_last_link(tmp_path):
    state = _state()
    for step in (2, 4, 6, 8):
        save_training_checkpoint(tmp_path, keep_last=2, **{**state, "step": step})
    assert [s for s, _ in list_step_checkpoints(tmp_path)] == [6, 8]
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 8
    save_training_checkpoint(tmp_path, keep_last=0, **{**state, "step": 10})
    assert [s for s, _ in list_step_checkpoints(tmp_path)] == [6, 8, 10]


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(os.urandom(256))
    with pytest.raises(CheckpointError, match="junk.pt: not a MedGMAE checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    model, _ = _tiny()
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="bare.pt: not a MedGMAE checkpoint .*state_dict"):
        load_checkpoint(tmp_path / "bare.pt")
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "ok.pt", **_state()))
    torch.save({**ckpt, "format": "medgmae-checkpoint/0"}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="format 'medgmae-checkpoint/0' is not supported"):
        load_checkpoint(tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path)
    bad_weights = {**ckpt, "model": {k: v for k, v in list(ckpt["model"].items())[1:]}}
    torch.save(bad_weights, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="partial.pt: weights do not match"):
        load_model(tmp_path / "partial.pt")


def test_weight_decay_groups():
    model, _ = _tiny("gaussian")
    skip = no_weight_decay_names(model)
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.05)
    assert opt.defaults["betas"] == (0.9, 0.95)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[1]["weight_decay"] == 0.0
    names = dict(model.named_parameters())
    for name in ("encoder.cls_token", "decoder.query_tokens"):
        assert name in skip and id(names[name]) not in decayed
    for name, p in names.items():
        if p.ndim <= 1 and p.requires_grad:  # norms and biases
            assert id(p) not in decayed, name
        if name.endswith("weight") and p.ndim >= 2:
            assert id(p) in decayed, name
    assert all(p.requires_grad for g in opt.param_groups for p in g["params"])  # fixed pos-embed left out


def test_warmup_cosine_schedule_and_resume():
    lam = WarmupCosine(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [lam(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lam(4) == pytest.approx(1.0) and lam(9) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lam(14) == pytest.approx(0.1) and lam(100) == pytest.approx(0.1)
    assert all(lam(s) >= lam(s + 1) for s in range(4, 20))
    model, _ = _tiny()

    def lrs(sched, n):
        out = []
        for _ in range(n):
            out.append(sched.get_last_lr()[0])
            sched.optimizer.step()
            sched.step()
        return out

    full = build_scheduler(build_optimizer(model, lr=1.0), 3, 10)
    expected = lrs(full, 10)
    part = build_scheduler(build_optimizer(model, lr=1.0), 3, 10)
    first = lrs(part, 4)
    resumed = build_scheduler(build_optimizer(model, lr=1.0), 3, 10)
    resumed.load_state_dict(part.state_dict())
    assert first + lrs(resumed, 6) == pytest.approx(expected)
    assert expected[2] == pytest.approx(1.0) and expected[-1] < 0.05
    with pytest.raises(ValueError, match="total steps"):
        WarmupCosine(1, 0)


def test_gradient_clipping():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    norm = clip_gradients([p], 1.0)
    assert float(norm) == pytest.approx(5.0)
    assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-5)
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    assert float(clip_gradients([p], 0.0)) == pytest.approx(5.0) and float(p.grad.norm()) == pytest.approx(5.0)
    assert math.isfinite(float(clip_gradients([torch.nn.Parameter(torch.zeros(1))], 1.0)))
