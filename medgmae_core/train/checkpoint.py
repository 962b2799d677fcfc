"""The one checkpoint format: atomic save, checked load, and ``load_model`` for every consumer.

A checkpoint is a ``torch.save``'d dict::

    format        "medgmae-checkpoint/1"
    model_config  ModelConfig.to_dict()
    model         state_dict (never DDP-prefixed)
    optimizer, scheduler, scaler   state_dicts or None
    step          optimiser steps completed
    rng           {"python", "numpy", "torch", "cuda"} generator states
    train_config  the run's settings (plain types)
    extra         anything else (loss history, skipped inputs, ...)

Everything in it is a tensor or a plain Python value, so it loads with
``torch.load(weights_only=True)``: opening a checkpoint never runs code.
Writes go to a temporary file in the same folder (``.NAME.<pid>.tmp``), are
fsync'ed, then ``os.replace``'d over the target, so a crash mid-write leaves the
previous file intact; a full disk is reported as such (torch's own message is
"unexpected pos ..."), and a temporary file left by a killed process is removed
when a run starts or resumes in that folder (:func:`remove_stale_temp_files`).

Each consumer asks for the kind it needs (:func:`require_kind`): a pre-training
checkpoint (``demo``, ``reconstruct --init medgmae``, the Slicer module), a
fine-tuned segmentation checkpoint (``segment``); the wrong kind is named in one
line instead of a list of mismatched weights.
"""
from __future__ import annotations

import errno
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import (InputError, OutputError, current_command, os_error_reason, remove_stale_temp_files, track_temp,
                      untrack_temp)

log = logging.getLogger(__name__)

FORMAT = "medgmae-checkpoint/1"
LAST_NAME = "last.pt"
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
# The bundled pre-training weights (CPU-trained, not the paper's; recipe and training list inside, see
# scripts/train_weights.py): the default of `medgmae demo`, `reconstruct --init medgmae`, `view` and the Slicer panel.
BUNDLED_WEIGHTS = WEIGHTS_DIR / "medgmae_tiny.pt"
BUNDLED_STAR_WEIGHTS = WEIGHTS_DIR / "medgmae_star_tiny.pt"  # MedGMAE* on top of them: `reconstruct --init medgmae*`
_STEP_RE = re.compile(r"^step_(\d+)\.pt$")


def bundled_weights(star: bool = False) -> Path | None:
    """The bundled MedGMAE (``star``: MedGMAE*) checkpoint, or None when it is not installed."""
    path = BUNDLED_STAR_WEIGHTS if star else BUNDLED_WEIGHTS
    return path if path.is_file() else None


class CheckpointError(InputError):
    """A file is not a usable MedGMAE checkpoint (or not the kind needed); the message names it."""


PRETRAINING, SEGMENTATION, RECONSTRUCTION = "pretraining", "segmentation", "reconstruction"
KIND_DESCRIPTIONS = {
    PRETRAINING: "a pre-training checkpoint (from `medgmae pretrain`, e.g. runs/NAME/last.pt, or the bundled demo "
                 "weights)",
    SEGMENTATION: "a segmentation checkpoint (from `medgmae finetune`)",
    RECONSTRUCTION: "a reconstruction checkpoint (recon_checkpoint.pt from `medgmae reconstruct`, for --resume)",
}


def checkpoint_kind(ckpt: dict[str, Any]) -> str:
    """``"pretraining"``, ``"segmentation"`` or ``"reconstruction"``."""
    if str(ckpt.get("format", "")).startswith("medgmae-recon-checkpoint") or (
            "params" in ckpt and "iteration" in ckpt):
        return RECONSTRUCTION
    if (ckpt.get("extra") or {}).get("task") == "segmentation":
        return SEGMENTATION
    return PRETRAINING


def require_kind(ckpt: dict[str, Any], path: str | Path, expected: str, needed_by: str | None = None) -> None:
    """A one-line ``CheckpointError`` if ``ckpt`` is not of the ``expected`` kind; ``needed_by`` names the
    consumer (default: the running command, e.g. "`medgmae demo`")."""
    kind = checkpoint_kind(ckpt)
    if kind == expected:
        return
    if needed_by is None:
        command = current_command()
        needed_by = f"`medgmae {command}`" if command else "this step"
    short = {PRETRAINING: "pre-training", SEGMENTATION: "segmentation (finetune)",
             RECONSTRUCTION: "reconstruction"}[kind]
    raise CheckpointError(f"{path}: this is a {short} checkpoint; {needed_by} needs "
                          f"{KIND_DESCRIPTIONS[expected]}")


def _mismatch_summary(exc: Exception) -> str:
    """A short description of a state_dict mismatch (torch lists every key)."""
    text = str(exc)
    parts = []
    for label in ("Missing key(s)", "Unexpected key(s)"):
        m = re.search(re.escape(label) + r" in state_dict: (.*?)(?:\.\s*(?:\n|$)|\n)", text, re.S)
        if m:
            keys = re.findall(r'"([^"]+)"', m.group(1))
            parts.append(f"{len(keys)} {label.split()[0].lower()} (e.g. {', '.join(keys[:3])})")
    shapes = re.findall(r"size mismatch for ([\w.]+)", text)
    if shapes:
        parts.append(f"{len(shapes)} with a different shape (e.g. {', '.join(shapes[:3])})")
    return "; ".join(parts) if parts else text.splitlines()[0][:200]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model under DistributedDataParallel / DataParallel wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


# ------------------------------------------------------------------ RNG state
def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA, if initialised) generator states, as weights-only-safe values."""
    mt_name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": mt_name, "keys": torch.from_numpy(np.asarray(keys, np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only if CUDA is available)."""
    if state.get("python") is not None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if state.get("numpy") is not None:
        s = state["numpy"]
        np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                             s["cached_gaussian"]))
    if state.get("torch") is not None:
        torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


# ------------------------------------------------------------------ writing
def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, fsync, then ``os.replace`` over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = track_temp(path.parent / f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(exc.errno, f"cannot write {path}: {os_error_reason(exc)}", str(path)) from exc
    except RuntimeError as exc:  # torch's writer: "unexpected pos ..." / "file write failed" on a full disk
        tmp.unlink(missing_ok=True)
        try:
            free = shutil.disk_usage(path.parent).free
        except OSError:
            free = -1
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if 0 <= free < 64 * 2**20:
            raise OutputError(errno.ENOSPC, f"cannot write {path}: disk full ({free / 2**20:.1f} MB free; "
                                            f"torch: {first})", str(path)) from exc
        raise OutputError(errno.EIO, f"cannot write {path}: the write failed ({first}); is the disk full?",
                          str(path)) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        untrack_temp(tmp)
    _fsync_dir(path.parent)
    return path


def _config_dict(config: Any, model: nn.Module) -> dict[str, Any]:
    if config is None:
        config = getattr(model, "config", None)
    if config is None:
        raise ValueError("save_checkpoint needs a model config (pass config=, or a model with .config)")
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def build_checkpoint(*, model: nn.Module, optimizer=None, scheduler=None, scaler=None, step: int = 0,
                     config: Any = None, train_config: dict[str, Any] | None = None,
                     extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint dict (see the module docstring)."""
    bare = unwrap_model(model)
    scaler_state = scaler.state_dict() if scaler is not None and getattr(scaler, "is_enabled", lambda: True)() else None
    return {
        "format": FORMAT,
        "model_config": _config_dict(config, bare),
        "model": {k: v.detach().cpu() for k, v in bare.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler_state,
        "step": int(step),
        "rng": rng_state(),
        "train_config": dict(train_config or {}),
        "extra": dict(extra or {}),
    }


def save_checkpoint(path: str | Path, *, model: nn.Module, optimizer=None, scheduler=None, scaler=None,
                    step: int = 0, config: Any = None, train_config: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint atomically to ``path``; returns the path."""
    ckpt = build_checkpoint(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, step=step,
                            config=config, train_config=train_config, extra=extra)
    return atomic_torch_save(ckpt, path)


def step_checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"step_{int(step):08d}.pt"


def save_training_checkpoint(out_dir: str | Path, *, step: int, keep_last: int = 3, **kwargs: Any) -> Path:
    """Write ``out_dir/step_XXXXXXXX.pt`` and point ``out_dir/last.pt`` at it; keep the newest ``keep_last``.

    ``last.pt`` is a hard link (replaced atomically), or a second atomic copy
    where the file system has no hard links. Returns the step file's path.
    """
    out_dir = Path(out_dir)
    ckpt = build_checkpoint(step=step, **kwargs)
    path = atomic_torch_save(ckpt, step_checkpoint_path(out_dir, step))
    last = out_dir / LAST_NAME
    link_tmp = out_dir / f".{LAST_NAME}.{os.getpid()}.link"
    try:
        link_tmp.unlink(missing_ok=True)
        os.link(path, link_tmp)
        os.replace(link_tmp, last)
        _fsync_dir(out_dir)
    except OSError:
        link_tmp.unlink(missing_ok=True)
        atomic_torch_save(ckpt, last)
    prune_checkpoints(out_dir, keep_last)
    return path


def list_step_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of ``step_*.pt`` files in ``out_dir``, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := _STEP_RE.match(p.name))]
    return sorted(found)


def clean_stale_temp_files(out_dir: str | Path) -> list[Path]:
    """Remove ``.step_….pt.<pid>.tmp`` / ``.last.pt.<pid>.link`` files of killed runs (SIGKILL mid-write) in
    ``out_dir``; runs call this when they start or resume. Files of running processes are kept."""
    return remove_stale_temp_files(out_dir)


def prune_checkpoints(out_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` step checkpoints (``keep_last <= 0`` keeps all)."""
    if keep_last <= 0:
        return
    for _, path in list_step_checkpoints(out_dir)[:-keep_last]:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------ reading
def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint; clear errors for a missing file, a non-checkpoint or a wrong format."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give a checkpoint file (e.g. {path / LAST_NAME})")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        kind = "holds objects a weights-only load refuses" if "weights_only" in str(exc) else "is not readable"
        raise CheckpointError(f"{path}: not a MedGMAE checkpoint (the file {kind}: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if isinstance(ckpt, dict) and checkpoint_kind(ckpt) == RECONSTRUCTION:
        raise CheckpointError(f"{path}: this is {KIND_DESCRIPTIONS[RECONSTRUCTION]}, not a model checkpoint")
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise CheckpointError(f"{path}: not a MedGMAE checkpoint (no 'format' key; a bare state_dict?)")
    if ckpt["format"] != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {ckpt['format']!r} is not supported (expected {FORMAT!r})")
    missing = [k for k in ("model_config", "model", "step") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint is missing {missing}")
    return ckpt


def load_model(path: str | Path, device: str | torch.device = "cpu", *, needed_by: str | None = None):
    """``(model, ModelConfig)`` from a pre-training checkpoint, on ``device``, in eval mode.

    The one way the CLI, Slicer, reconstruction and segmentation load a pre-trained model. Another kind of
    checkpoint (segmentation, reconstruction) is refused in one line naming both kinds (``needed_by``: who
    needs it, default the running command).
    """
    # lazy: model loads MONAI (~2 s); this module stays light for the CLI and Slicer (train/__init__.py)
    from ..model import ModelConfig, build_model

    ckpt = load_checkpoint(path, map_location="cpu")
    require_kind(ckpt, path, PRETRAINING, needed_by)
    try:
        config = ModelConfig.from_dict(ckpt["model_config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid model config in checkpoint ({exc})") from exc
    model = build_model(config)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the stored model config "
                              f"({_mismatch_summary(exc)})") from exc
    return model.to(device).eval(), config


def restore_training_state(ckpt: dict[str, Any], *, model: nn.Module, optimizer=None, scheduler=None,
                           scaler=None, rng: bool = True) -> int:
    """Load weights, optimiser, scheduler, scaler (and RNG states) from ``ckpt``; returns its step."""
    unwrap_model(model).load_state_dict(ckpt["model"])
    if optimizer is not None and ckpt.get("optimizer") is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler") is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    if rng and ckpt.get("rng"):
        set_rng_state(ckpt["rng"])
    return int(ckpt["step"])
