"""``medgmae pretrain``: self-supervised pre-training (MedGMAE, MedGMAE* or the voxel-MAE baseline).

Configuration: built-in defaults < ``--config run.yaml`` < command-line flags.
The YAML is flat and uses the flags' names (``batch_size: 4`` for
``--batch-size 4``), plus an optional ``model_overrides:`` mapping of
:class:`~medgmae_core.model.ModelConfig` fields. Examples ship in
``medgmae_core/configs/``.

Runs are resumable and reproducible: the crops, masks and augmentations of
step ``s`` are a function of (seed, s, rank), so ``--resume`` continues
exactly as if the run had never stopped. Checkpoints (``step_*.pt`` and
``last.pt``) are written atomically every ``--checkpoint-every`` steps, at the
end and on SIGTERM/SIGINT; a killed run loses at most the steps since its last
checkpoint. ``loss_curve.png`` and ``config.yaml`` are written beside them.

Several GPUs or nodes: ``torchrun --nproc_per_node=G -m medgmae_core.cli pretrain ...``
(NCCL on CUDA, gloo on CPU; only rank 0 writes or prints). ``--batch-size`` is per process.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

COMMAND = "pretrain"
AMP_CHOICES = ("none", "auto", "bf16", "fp16")
CACHE_CHOICES = ("auto", "none", "memory", "disk")
MEMORY_CACHE_MAX_CASES = 16  # cache="auto" keeps up to this many preprocessed volumes in RAM

# Every setting: its default and one line of help. The CLI flag is --name-with-dashes.
SETTINGS: dict[str, tuple[Any, str]] = {
    # data
    "data": (None, "one or more of: a folder of NIfTI/NRRD/DICOM series, one volume, a MONAI datalist JSON, "
                   "phantom[:N] (N generated phantoms, seeds 0..N-1, default 8); all are used together"),
    "datalist_key": ("training", "key of the case list in a datalist JSON"),
    "spacing_mm": (1.5, "isotropic resampling spacing in mm"),
    "crops_per_case": (3, "random crops taken from each loaded case"),
    "pos": (3.0, "weight of foreground-centred crops (pos:neg)"),
    "neg": (1.0, "weight of crops centred anywhere (pos:neg)"),
    "cache": ("auto", "preprocessed-volume cache: memory (MONAI CacheDataset), disk (PersistentDataset in "
                      "--cache-dir), none; auto = disk if --cache-dir is given, else memory for phantoms or <= 16 volumes, "
                      "else none"),
    "cache_dir": (None, "folder for the disk cache"),
    "phantom_shape": ([128, 128, 96], "phantom size X,Y,Z in voxels (with --data phantom)"),
    # model
    "model": ("tiny", "model size: tiny, base or large"),
    "objective": ("gaussian", "proxy task: gaussian (MedGMAE), gaussian_star (MedGMAE*) or voxel (MAE baseline)"),
    "img_size": (96, "crop / model input size: N or D,H,W"),
    "patch_size": (None, "patch size: N or D,H,W (default: the model's, 12)"),
    "num_gaussians": (None, "Gaussian queries k (default: the model's)"),
    "mask_ratio": (0.75, "fraction of patches hidden from the encoder"),
    "loss": ("masked", "masked (paper: MSE on masked voxels) or release (full-volume MSE against x*mask)"),
    "model_overrides": ({}, "YAML only: extra ModelConfig fields"),
    # optimisation
    "steps": (1000, "optimiser steps in total"),
    "batch_size": (2, "crops per step and process"),
    "lr": (1e-4, "peak learning rate (AdamW)"),
    "min_lr_ratio": (0.0, "final learning rate as a fraction of --lr"),
    "warmup_steps": (None, "linear warmup steps (default: 5%% of --steps)"),
    "weight_decay": (0.05, "AdamW weight decay (not on norms, biases, tokens)"),
    "clip_grad": (1.0, "gradient norm clip (0: off)"),
    "seed": (0, "random seed (model init, data order, crops, masks)"),
    "device": ("auto", "auto, cpu, cuda or cuda:N"),
    "amp": ("none", "mixed precision: none, auto (bf16 on CPU, bf16/fp16 on CUDA), bf16, fp16 (CUDA); "
                    "the renderer always runs in fp32"),
    "num_workers": (0, "data-loading worker processes"),
    # output
    "out_dir": ("runs/pretrain", "folder for checkpoints, loss_curve.png and config.yaml"),
    "checkpoint_every": (100, "write a checkpoint every N steps (and at the end)"),
    "keep_last": (3, "step checkpoints to keep besides last.pt (0: all)"),
    "log_every": (1, "report progress every N steps"),
    "resume": (None, "checkpoint to continue from, or 'auto' (OUT/last.pt if it exists)"),
    "progress_json": (False, "print JSON progress lines on stdout (for programs, e.g. the Slicer panel)"),
}
# Settings that define what a run computes: changing them on --resume breaks exact continuation.
RUN_DEFINING = ("data", "datalist_key", "spacing_mm", "crops_per_case", "pos", "neg", "phantom_shape", "seed",
                "batch_size", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "clip_grad", "amp")
MODEL_KEYS = ("model", "objective", "img_size", "patch_size", "num_gaussians", "mask_ratio", "loss", "model_overrides")
# Settings of one session, never inherited from the checkpoint on --resume.
SESSION_KEYS = ("resume", "progress_json", "device", "num_workers", "out_dir", "cache", "cache_dir")


# ------------------------------------------------------------------ configuration
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def shipped_configs() -> list[str]:
    """Names of the example YAMLs in ``medgmae_core/configs`` (usable as ``--config NAME``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name: str | Path) -> Path:
    """A YAML path, or the name of a shipped example (``phantom`` or ``pretrain_phantom``)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / f"{name}.yaml", CONFIG_DIR / f"pretrain_{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"config file not found: {path} (shipped examples: {', '.join(shipped_configs())})")


def load_settings_yaml(path: str | Path) -> dict[str, Any]:
    """Settings from a YAML file; ``null`` values count as not given."""
    import yaml

    path = resolve_config_path(path)
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML ({exc})") from exc
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(content).__name__}")
    content = {str(k).replace("-", "_"): v for k, v in content.items()}
    unknown = sorted(set(content) - set(SETTINGS))
    if unknown:
        raise ValueError(f"{path}: unknown settings {unknown}; known: {sorted(SETTINGS)}")
    if not isinstance(content.get("model_overrides") or {}, dict):
        raise ValueError(f"{path}: model_overrides must be a mapping of ModelConfig fields")
    return {k: v for k, v in content.items() if v is not None}


def _size(value: Any, name: str) -> list[int] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, int) else list(value)
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or any(not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name} must be N or three positive ints D,H,W, got {value!r}")
    return values


def validate_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """Normalise and check a merged settings dict; errors name the setting."""
    cfg = dict(cfg)
    if not cfg.get("data"):
        raise ValueError("no training data: pass --data FOLDER|FILE|DATALIST.json|phantom[:N] (or 'data:' in the YAML)")
    data = cfg["data"] if isinstance(cfg["data"], (list, tuple)) else [cfg["data"]]
    cfg["data"] = [str(d) for d in data]
    cfg["img_size"] = _size(cfg["img_size"], "img_size")
    cfg["patch_size"] = _size(cfg["patch_size"], "patch_size")
    cfg["phantom_shape"] = _size(cfg["phantom_shape"], "phantom_shape")
    for name in ("steps", "batch_size", "crops_per_case", "checkpoint_every", "log_every"):
        if int(cfg[name]) < 1:
            raise ValueError(f"{name} must be >= 1, got {cfg[name]}")
        cfg[name] = int(cfg[name])
    for name in ("num_workers", "keep_last"):
        if int(cfg[name]) < 0:
            raise ValueError(f"{name} must be >= 0, got {cfg[name]}")
        cfg[name] = int(cfg[name])
    if cfg["warmup_steps"] is None:
        cfg["warmup_steps"] = max(1, round(0.05 * cfg["steps"]))
    if int(cfg["warmup_steps"]) < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {cfg['warmup_steps']}")
    if not float(cfg["spacing_mm"]) > 0:
        raise ValueError(f"spacing_mm must be positive, got {cfg['spacing_mm']}")
    if cfg["amp"] not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {AMP_CHOICES}, got {cfg['amp']!r}")
    if cfg["cache"] not in CACHE_CHOICES:
        raise ValueError(f"cache must be one of {CACHE_CHOICES}, got {cfg['cache']!r}")
    if float(cfg["pos"]) < 0 or float(cfg["neg"]) < 0 or float(cfg["pos"]) + float(cfg["neg"]) <= 0:
        raise ValueError(f"pos and neg must be >= 0 and not both 0, got {cfg['pos']}:{cfg['neg']}")
    return cfg


def build_model_config(cfg: dict[str, Any]):
    from ..model import get_config

    overrides = dict(cfg.get("model_overrides") or {})
    overrides.update(img_size=tuple(cfg["img_size"]), objective=cfg["objective"], mask_ratio=float(cfg["mask_ratio"]),
                     loss=cfg["loss"])
    if cfg.get("patch_size"):
        overrides["patch_size"] = tuple(cfg["patch_size"])
    if cfg.get("num_gaussians"):
        overrides["num_gaussians"] = int(cfg["num_gaussians"])
    return get_config(cfg["model"], **overrides)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        amp = "bf16" if device.type == "cpu" or torch.cuda.is_bf16_supported() else "fp16"
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device; use --amp bf16 on CPU")
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


# ------------------------------------------------------------------ pieces of a run
def build_data(cfg: dict[str, Any], report, verbose: bool = True):
    """The crop dataset for these settings; bad inputs go into ``report``."""
    from ..data.datasets import (PretrainCrops, discover_volumes, parse_phantom_spec, phantom_cases,
                                 validate_volumes)

    cases, n_phantoms = [], 0
    for spec in cfg["data"]:
        n = parse_phantom_spec(spec)
        if n is not None:
            n_phantoms += n
            cases += phantom_cases(n, shape=cfg["phantom_shape"], spacing_mm=float(cfg["spacing_mm"]))
            continue
        found = discover_volumes(spec, cfg["datalist_key"])
        if not found:
            raise ValueError(f"--data {spec}: no NIfTI/NRRD/MHA volumes or DICOM series found")
        usable = validate_volumes(found, report)
        if not usable:
            raise ValueError(f"--data {spec}: no usable CT volumes ({report.summary()})")
        cases += usable
    cache = cfg["cache"]
    if cache == "auto":
        if cfg.get("cache_dir"):
            cache = "disk"
        elif n_phantoms or len(cases) <= MEMORY_CACHE_MAX_CASES:
            cache = "memory"
        else:
            cache = "none"
            if verbose:
                log.warning("%d volumes and no --cache-dir: every case is re-read and resampled each time it is "
                            "used; pass --cache-dir for a disk cache", len(cases))
    return PretrainCrops(cases, roi_size=cfg["img_size"], spacing_mm=float(cfg["spacing_mm"]),
                         crops_per_case=cfg["crops_per_case"], pos=float(cfg["pos"]), neg=float(cfg["neg"]),
                         seed=int(cfg["seed"]), cache=cache, cache_dir=cfg.get("cache_dir"))


def write_loss_curve(history: torch.Tensor, path: Path, title: str = "pre-training loss") -> Path | None:
    """PNG of loss against step (raw and smoothed), written atomically; None if there is nothing to plot."""
    if history.numel() == 0:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    steps, losses = history[:, 0].numpy(), history[:, 1].numpy()
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, losses, lw=0.8, alpha=0.4, label="loss")
    if len(losses) >= 5:  # bias-corrected exponential moving average
        alpha = min(0.3, max(0.005, 5.0 / len(losses)))
        ema, smooth = 0.0, []
        for t, v in enumerate(losses, start=1):
            ema = (1 - alpha) * ema + alpha * float(v)
            smooth.append(ema / (1 - (1 - alpha) ** t))
        ax.plot(steps, smooth, lw=1.5, label=f"smoothed (EMA {alpha:.3g})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    if (losses > 0).all():
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp.png"
    fig.savefig(tmp)
    os.replace(tmp, path)
    return path


def _write_config_yaml(cfg: dict[str, Any], model_config, path: Path) -> None:
    import yaml

    body = {k: v for k, v in cfg.items() if k not in ("resume", "progress_json")}
    text = ("# medgmae pretrain: resolved settings of this run\n" + yaml.safe_dump(body, sort_keys=False) +
            "# model config\n" + yaml.safe_dump({"model_config": model_config.to_dict()}, sort_keys=False))
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop finishes its step, saves a checkpoint and exits."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: finishing this step, saving a checkpoint, then stopping", self.signal_name)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __bool__(self) -> bool:
        return self.signal_name is not None


def resolve_resume(resume: str | None, out_dir: Path) -> Path | None:
    if not resume:
        return None
    if resume == "auto":
        last = out_dir / "last.pt"
        return last if last.exists() else None
    path = Path(resume).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--resume: checkpoint not found: {path}")
    return path


def run(explicit: dict[str, Any], device: torch.device, info) -> int:
    """Train with the user's ``explicit`` settings on ``device``; returns the exit code."""
    import random

    import numpy as np

    from ..data.datasets import SkipReport, crop_batches, derive_seed
    from ..model import ModelConfig, build_model
    from ..progress import ProgressReporter
    from .checkpoint import LAST_NAME, load_checkpoint, restore_training_state, save_training_checkpoint
    from .distributed import all_reduce_mean, any_rank, barrier, wrap_model
    from .optim import build_optimizer, build_scheduler, clip_gradients

    defaults = {k: v for k, (v, _) in SETTINGS.items()}
    out_dir = Path(explicit.get("out_dir", defaults["out_dir"])).expanduser()
    resume_path = resolve_resume(explicit.get("resume"), out_dir)
    if resume_path and explicit.get("resume") != "auto" and "out_dir" not in explicit:
        out_dir = resume_path.parent  # continue writing beside the checkpoint
        explicit = {**explicit, "out_dir": str(out_dir)}
    ckpt = load_checkpoint(resume_path) if resume_path else None
    if ckpt is None and (out_dir / LAST_NAME).exists():
        raise ValueError(f"{out_dir} already holds a run ({out_dir / LAST_NAME}); pass --resume auto to continue it, "
                         "or choose another --out")
    inherited = {k: v for k, v in (ckpt["train_config"] if ckpt else {}).items() if k not in SESSION_KEYS}
    cfg = validate_settings({**defaults, **inherited, **explicit})
    if ckpt:
        changed = [k for k in RUN_DEFINING if k in ckpt["train_config"] and ckpt["train_config"][k] != cfg[k]]
        if changed and info.is_main:
            log.warning("resuming with changed settings %s: the run will not equal an uninterrupted one", changed)
        model_config = ModelConfig.from_dict(ckpt["model_config"])
        asked = {k: explicit[k] for k in MODEL_KEYS if k in explicit}
        if asked and build_model_config(validate_settings({**cfg, **asked})) != model_config and info.is_main:
            log.warning("--resume keeps the checkpoint's model config; ignoring model settings %s", sorted(asked))
        cfg.update({k: ckpt["train_config"][k] for k in MODEL_KEYS if k in ckpt["train_config"]})
    else:
        model_config = build_model_config(cfg)
    amp_dtype = resolve_amp(cfg["amp"], device)

    seed = int(cfg["seed"])
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    model = build_model(model_config).to(device)
    optimizer = build_optimizer(model, lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))
    scheduler = build_scheduler(optimizer, int(cfg["warmup_steps"]), cfg["steps"], float(cfg["min_lr_ratio"]))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_step, history = 0, []  # history: [step, mean loss] per step
    report = SkipReport(verbose=info.is_main)
    if ckpt:
        start_step = restore_training_state(ckpt, model=model, optimizer=optimizer, scheduler=scheduler,
                                            scaler=scaler)
        for lam in scheduler.lr_lambdas:  # --steps may have been raised to extend a run
            lam.total_steps = cfg["steps"]
        extra = ckpt.get("extra") or {}
        history = extra["history"].tolist() if "history" in extra else []
        for name, reason in (extra.get("skipped") or {}).items():
            report.reasons[name] = reason
    if start_step >= cfg["steps"]:
        raise ValueError(f"the checkpoint is at step {start_step}, which already reaches --steps {cfg['steps']}; "
                         "raise --steps to train further")

    dataset = build_data(cfg, report, verbose=info.is_main)
    training_data = [str(c["name"]) for c in dataset.cases]  # what this checkpoint saw, for zero-shot checks
    ddp_model = wrap_model(model, info, device)
    reporter = None
    if info.is_main:
        from ..errors import make_output_dir, track_temp
        from .checkpoint import clean_stale_temp_files

        make_output_dir(out_dir)  # a failed run removes it again if it is still empty
        clean_stale_temp_files(out_dir)  # e.g. .step_….pt.<pid>.tmp of a run killed mid-write
        fresh_config = not (out_dir / "config.yaml").exists()
        _write_config_yaml(cfg, model_config, out_dir / "config.yaml")
        if fresh_config:  # a new run that fails before its first checkpoint leaves nothing behind
            track_temp(out_dir / "config.yaml")
        reporter = ProgressReporter(COMMAND, cfg["steps"], json_lines=bool(cfg["progress_json"]), initial=start_step)
        reporter.start(out_dir=str(out_dir), model=model_config.name, objective=model_config.objective,
                       cases=len(dataset), skipped=len(report), device=str(device), world_size=info.world_size,
                       batch_size=cfg["batch_size"], resumed_from=str(resume_path) if resume_path else None,
                       start_step=start_step)

    def save(step: int) -> Path | None:
        if not info.is_main:
            return None
        curve = torch.tensor(history, dtype=torch.float64).reshape(-1, 2)
        path = save_training_checkpoint(
            out_dir, step=step, keep_last=cfg["keep_last"], model=model, optimizer=optimizer, scheduler=scheduler,
            scaler=scaler, config=model_config, train_config={k: cfg[k] for k in SETTINGS if k != "resume"},
            extra={"history": curve, "skipped": dict(report.reasons), "training_data": training_data})
        write_loss_curve(curve, out_dir / "loss_curve.png", f"{model_config.name} / {model_config.objective}")
        from ..errors import untrack_temp

        untrack_temp(out_dir / "config.yaml")  # the run now has a checkpoint: its config.yaml stays
        reporter.checkpoint(step, str(path))
        return path

    batches = crop_batches(dataset, cfg["batch_size"], start_step=start_step, rank=info.rank,
                           world_size=info.world_size, num_workers=cfg["num_workers"],
                           pin_memory=device.type == "cuda" and cfg["num_workers"] > 0)
    step, saved_step, skipped_steps = start_step, start_step, 0
    ddp_model.train()
    with StopRequest() as stop:
        try:
            while step < cfg["steps"]:
                t0 = time.perf_counter()
                try:
                    batch, skipped = next(batches)
                except RuntimeError:
                    if stop:  # the data workers were signalled too
                        break
                    raise
                for name, reason in skipped:
                    report.add(name, reason)
                data_time = time.perf_counter() - t0
                batch = batch.to(device, non_blocking=True)
                generator = torch.Generator(device=device)
                generator.manual_seed(derive_seed(seed, step, info.rank, 1))  # this step's masks
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    loss = ddp_model(batch, generator=generator).loss
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                grad_norm = clip_gradients(model.parameters(), float(cfg["clip_grad"]))
                if scaler.is_enabled():
                    scaler.step(optimizer)
                elif torch.isfinite(grad_norm):
                    optimizer.step()
                else:  # identical on every rank: gradients are already averaged
                    skipped_steps += 1
                    if info.is_main:
                        log.warning("step %d: non-finite gradient norm, update skipped", step + 1)
                scaler.update()
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                loss_value = float(all_reduce_mean(loss.detach().float(), info))
                step += 1
                history.append([step, loss_value])
                step_time = time.perf_counter() - t0
                if reporter and (step % cfg["log_every"] == 0 or step == cfg["steps"]):
                    metrics = dict(loss=loss_value, lr=lr, step_time=round(step_time, 4), data_time=round(data_time, 4),
                                   samples_per_s=round(cfg["batch_size"] * info.world_size / step_time, 3),
                                   grad_norm=float(grad_norm), skipped=len(report))
                    if not cfg["progress_json"]:  # a short bar for people
                        metrics = {k: metrics[k] for k in ("loss", "lr", "samples_per_s", "skipped")}
                    reporter.progress(step, **metrics)
                stopping = any_rank(bool(stop), info, device)
                if step % cfg["checkpoint_every"] == 0 or step == cfg["steps"] or stopping:
                    save(step)
                    saved_step = step
                    barrier(info)
                if stopping:
                    break
        finally:
            batches.close()
        if stop and saved_step != step:  # stopped while waiting for data
            save(step)

    if reporter:
        final_loss = history[-1][1] if history else float("nan")
        fields = dict(step=step, checkpoint=str(out_dir / LAST_NAME), loss_curve=str(out_dir / "loss_curve.png"),
                      final_loss=final_loss, skipped=len(report), skipped_inputs=dict(report.reasons),
                      nonfinite_steps=skipped_steps)
        if stop:
            fields["stopped_by"] = stop.signal_name
        reporter.done(**fields)
        if len(report) and not cfg["progress_json"]:
            log.warning(report.summary())
    if stop and step < cfg["steps"]:
        return 128 + int(getattr(signal, stop.signal_name or "SIGTERM"))
    return 0
