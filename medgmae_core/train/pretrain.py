"""A pre-training run (MedGMAE, MedGMAE* or the voxel-MAE baseline): ``run(explicit settings, device, dist info)``.

Settings are ``train.settings`` (typed ``PretrainSettings``; defaults < ``--config run.yaml`` < flags), one
optimiser step is ``train.engine.train_step``, the command line is ``commands.pretrain``.

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
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ..data.datasets import (PretrainCrops, SkipReport, crop_batches, derive_seed, discover_volumes, parse_phantom_spec,
                             phantom_cases, validate_volumes)
from ..errors import make_output_dir, track_temp, untrack_temp
from ..export.figures import loss_curve_png
from ..model import ModelConfig, build_model
from ..progress import ProgressReporter
from .checkpoint import (LAST_NAME, PRETRAINING, CheckpointError, _mismatch_summary, clean_stale_temp_files,
                         load_checkpoint, require_kind, restore_training_state, save_training_checkpoint)
from .distributed import all_reduce_mean, any_rank, barrier, wrap_model
from .engine import StopRequest, train_step
from .optim import build_optimizer, build_scheduler
from .settings import (MODEL_KEYS, RUN_DEFINING, SESSION_KEYS, SETTINGS, PretrainSettings, build_model_config,
                       resolve_amp, validate_settings)

log = logging.getLogger(__name__)

COMMAND = "pretrain"
MEMORY_CACHE_MAX_CASES = 16  # cache="auto" keeps up to this many preprocessed volumes in RAM


# ------------------------------------------------------------------ pieces of a run
def build_data(cfg: PretrainSettings, report, verbose: bool = True):
    """The crop dataset for these settings; bad inputs go into ``report``."""
    cases, n_phantoms = [], 0
    for spec in cfg.data:
        n = parse_phantom_spec(spec)
        if n is not None:
            n_phantoms += n
            cases += phantom_cases(n, shape=cfg.phantom_shape, spacing_mm=float(cfg.spacing_mm))
            continue
        found = discover_volumes(spec, cfg.datalist_key)
        if not found:
            raise ValueError(f"--data {spec}: no NIfTI/NRRD/MHA volumes or DICOM series found")
        usable = validate_volumes(found, report)
        if not usable:
            raise ValueError(f"--data {spec}: no usable CT volumes ({report.summary()})")
        cases += usable
    cache = cfg.cache
    if cache == "auto":
        if cfg.cache_dir:
            cache = "disk"
        elif n_phantoms or len(cases) <= MEMORY_CACHE_MAX_CASES:
            cache = "memory"
        else:
            cache = "none"
            if verbose:
                log.warning("%d volumes and no --cache-dir: every case is re-read and resampled each time it is "
                            "used; pass --cache-dir for a disk cache", len(cases))
    return PretrainCrops(cases, roi_size=cfg.img_size, spacing_mm=float(cfg.spacing_mm),
                         crops_per_case=cfg.crops_per_case, pos=float(cfg.pos), neg=float(cfg.neg),
                         seed=int(cfg.seed), cache=cache, cache_dir=cfg.cache_dir)


def _write_config_yaml(cfg: PretrainSettings, model_config, path: Path) -> None:
    body = {k: v for k, v in cfg.to_dict().items() if k not in ("resume", "progress_json")}
    text = ("# medgmae pretrain: resolved settings of this run\n" + yaml.safe_dump(body, sort_keys=False) +
            "# model config\n" + yaml.safe_dump({"model_config": model_config.to_dict()}, sort_keys=False))
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)


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


def initialise_from(model, path: str) -> list[str]:
    """Load a pre-training checkpoint's weights into ``model`` (``--init-from``); returns its training list.

    Every parameter must match, except that a MedGMAE* model may start from a MedGMAE checkpoint: its encoder,
    decoder and heads are loaded and its residual levels (``levels.*``) start fresh."""
    parent = load_checkpoint(Path(path).expanduser())
    require_kind(parent, path, PRETRAINING, "pretrain --init-from")
    try:
        missing, unexpected = model.load_state_dict(parent["model"], strict=False)
        fresh_levels = bool(missing) and all(k.startswith("levels.") for k in missing)
        if unexpected or (missing and not fresh_levels):
            model.load_state_dict(parent["model"])  # raises with the full list
    except RuntimeError as exc:
        raise CheckpointError(f"--init-from {path}: its weights do not fit the model these settings build "
                              f"({_mismatch_summary(exc)}); use the same model, objective, img_size, patch_size "
                              "and num_gaussians (a MedGMAE* run may start from a MedGMAE checkpoint)") from exc
    if missing:
        log.info("--init-from %s: %d residual-level tensors start fresh", path, len(missing))
    ours = model.config.to_dict()
    changed = sorted(k for k, v in (parent.get("model_config") or {}).items()
                     if k in ours and ours[k] != v and k != "name" and k != "objective" and not k.startswith("star_"))
    if changed:  # same parameters, different computation (e.g. intensity_prior_radius)
        log.warning("--init-from %s: the model settings %s differ from the checkpoint's", path, changed)
    extra = parent.get("extra") or {}
    return [str(n) for n in extra.get("training_data") or []]


def run(explicit: dict[str, Any], device: torch.device, info) -> int:
    """Train with the user's ``explicit`` settings on ``device``; returns the exit code."""
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
    cfg = PretrainSettings.from_dict(validate_settings({**defaults, **inherited, **explicit}))
    if ckpt:
        changed = [k for k in RUN_DEFINING if k in ckpt["train_config"] and ckpt["train_config"][k] != getattr(cfg, k)]
        if changed and info.is_main:
            log.warning("resuming with changed settings %s: the run will not equal an uninterrupted one", changed)
        model_config = ModelConfig.from_dict(ckpt["model_config"])
        asked = {k: explicit[k] for k in MODEL_KEYS if k in explicit}
        if asked and build_model_config(validate_settings({**cfg.to_dict(), **asked})) != model_config and info.is_main:
            log.warning("--resume keeps the checkpoint's model config; ignoring model settings %s", sorted(asked))
        cfg = cfg.replace(**{k: ckpt["train_config"][k] for k in MODEL_KEYS if k in ckpt["train_config"]})
    else:
        model_config = build_model_config(cfg)
    amp_dtype = resolve_amp(cfg.amp, device)

    seed = int(cfg.seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    model = build_model(model_config).to(device)
    optimizer = build_optimizer(model, lr=float(cfg.lr), weight_decay=float(cfg.weight_decay))
    scheduler = build_scheduler(optimizer, int(cfg.warmup_steps), cfg.steps, float(cfg.min_lr_ratio))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_step, history = 0, []  # history: [step, mean loss] per step
    report = SkipReport(verbose=info.is_main)
    parent_data: list[str] = []  # what the --init-from checkpoint was trained on: this run has seen it too
    if cfg.init_from and not ckpt:
        parent_data = initialise_from(model, cfg.init_from)
    if ckpt:
        start_step = restore_training_state(ckpt, model=model, optimizer=optimizer, scheduler=scheduler,
                                            scaler=scaler)
        for lam in scheduler.lr_lambdas:  # --steps may have been raised to extend a run
            lam.total_steps = cfg.steps
        extra = ckpt.get("extra") or {}
        history = extra["history"].tolist() if "history" in extra else []
        parent_data = [str(n) for n in extra.get("parent_training_data") or []]
        for name, reason in (extra.get("skipped") or {}).items():
            report.reasons[name] = reason
    if start_step >= cfg.steps:
        raise ValueError(f"the checkpoint is at step {start_step}, which already reaches --steps {cfg.steps}; "
                         "raise --steps to train further")

    dataset = build_data(cfg, report, verbose=info.is_main)
    training_data = [str(c["name"]) for c in dataset.cases]  # what this checkpoint saw, for zero-shot checks
    training_data += [name for name in parent_data if name not in training_data]
    ddp_model = wrap_model(model, info, device)
    reporter = None
    if info.is_main:
        make_output_dir(out_dir)  # a failed run removes it again if it is still empty
        clean_stale_temp_files(out_dir)  # e.g. .step_….pt.<pid>.tmp of a run killed mid-write
        fresh_config = not (out_dir / "config.yaml").exists()
        _write_config_yaml(cfg, model_config, out_dir / "config.yaml")
        if fresh_config:  # a new run that fails before its first checkpoint leaves nothing behind
            track_temp(out_dir / "config.yaml")
        reporter = ProgressReporter(COMMAND, cfg.steps, json_lines=bool(cfg.progress_json), initial=start_step)
        reporter.start(out_dir=str(out_dir), model=model_config.name, objective=model_config.objective,
                       cases=len(dataset), skipped=len(report), device=str(device), world_size=info.world_size,
                       batch_size=cfg.batch_size, resumed_from=str(resume_path) if resume_path else None,
                       start_step=start_step)

    def save(step: int) -> Path | None:
        if not info.is_main:
            return None
        curve = torch.tensor(history, dtype=torch.float64).reshape(-1, 2)
        path = save_training_checkpoint(
            out_dir, step=step, keep_last=cfg.keep_last, model=model, optimizer=optimizer, scheduler=scheduler,
            scaler=scaler, config=model_config, train_config={k: v for k, v in cfg.to_dict().items() if k != "resume"},
            extra={"history": curve, "skipped": dict(report.reasons), "training_data": training_data,
                   "parent_training_data": parent_data})
        loss_curve_png(curve, out_dir / "loss_curve.png", f"{model_config.name} / {model_config.objective}")
        untrack_temp(out_dir / "config.yaml")  # the run now has a checkpoint: its config.yaml stays
        reporter.checkpoint(step, str(path))
        return path

    batches = crop_batches(dataset, cfg.batch_size, start_step=start_step, rank=info.rank,
                           world_size=info.world_size, num_workers=cfg.num_workers,
                           pin_memory=device.type == "cuda" and cfg.num_workers > 0)
    step, saved_step, skipped_steps = start_step, start_step, 0
    ddp_model.train()
    with StopRequest() as stop:
        try:
            while step < cfg.steps:
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
                result = train_step(ddp_model, model, batch, generator, optimizer=optimizer, scheduler=scheduler,
                                    scaler=scaler, clip_grad=cfg.clip_grad, amp_dtype=amp_dtype, device=device)
                loss, grad_norm, lr = result.loss, result.grad_norm, result.lr
                if not result.updated:
                    skipped_steps += 1
                    if info.is_main:
                        log.warning("step %d: non-finite gradient norm, update skipped", step + 1)
                loss_value = float(all_reduce_mean(loss.detach().float(), info))
                step += 1
                history.append([step, loss_value])
                step_time = time.perf_counter() - t0
                if reporter and (step % cfg.log_every == 0 or step == cfg.steps):
                    metrics = dict(loss=loss_value, lr=lr, step_time=round(step_time, 4), data_time=round(data_time, 4),
                                   samples_per_s=round(cfg.batch_size * info.world_size / step_time, 3),
                                   grad_norm=float(grad_norm), skipped=len(report))
                    if not cfg.progress_json:  # a short bar for people
                        metrics = {k: metrics[k] for k in ("loss", "lr", "samples_per_s", "skipped")}
                    reporter.progress(step, **metrics)
                stopping = any_rank(bool(stop), info, device)
                if step % cfg.checkpoint_every == 0 or step == cfg.steps or stopping:
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
        if len(report) and not cfg.progress_json:
            log.warning(report.summary())
    if stop and step < cfg.steps:
        return 128 + int(getattr(signal, stop.signal_name or "SIGTERM"))
    return 0
