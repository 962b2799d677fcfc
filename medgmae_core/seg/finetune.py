"""Fine-tuning UNETR segmentation from a pre-trained (or no) encoder: ``run(FinetuneSettings)`` (``medgmae finetune``).

The run's engine, as MAE splits entry point and engine: ``commands.finetune`` turns flags and ``--config`` YAML
into a ``seg.settings.FinetuneSettings``; ``seg.cases`` gives the cases and label maps (``task_cases``) and each
step's batch (``step_batch``, a pure function of (seed, step), so a resumed run sees the batches an
uninterrupted one would); ``seg.transforms`` is the pipeline. This module builds the network, runs the loop
(``finetune_step`` per step, ``validate`` every ``--val-every``) and writes checkpoints, history and curves.

Optimisation: Dice+CE, AdamW with layer-wise lr decay over the encoder (block i gets
``lr * decay^(depth + 1 - layer)``; ``train.optim.param_groups``, the one weight-decay rule), warmup + cosine,
gradient clipping; ``--freeze-encoder`` trains the decoder only. Checkpoints are the one format
(``train.checkpoint``: atomic ``step_*.pt`` + ``last.pt``, ``best.pt`` by validation Dice) with the label names,
spacing and UNETR architecture in ``extra``. Progress is JSON lines (``--progress-json``); ``curves.png``
(``export.figures.save_figure``, atomic) plots loss and validation Dice.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss

from ..data.transforms import HU_WINDOW
from ..errors import make_output_dir
from ..export.figures import save_figure
from ..model.configs import get_config
from ..progress import ProgressReporter
from ..train.checkpoint import (LAST_NAME, load_checkpoint, restore_training_state, save_checkpoint,
                                save_training_checkpoint)
from ..train.distributed import resolve_device
from ..train.optim import build_scheduler, clip_gradients, param_groups
from .cases import preprocess_cases, step_batch, task_cases
from .evaluate import dice_score
from .settings import FinetuneSettings
from .transfer import load_encoder, read_pretrained
from .transforms import IMAGE, LABEL, augment_transforms, preprocess_transforms
from .unetr import SEG_TASK, UNETR

log = logging.getLogger(__name__)


# ============================================================== network and optimisation
def build_network(settings: FinetuneSettings, out_channels: int, roi: tuple[int, int, int]) -> tuple[UNETR, dict]:
    """UNETR (+ pre-trained encoder if ``--encoder``), and a description of the encoder's origin."""
    s = settings
    if s.encoder:
        pre = read_pretrained(s.encoder)
        if s.patch_size and tuple([s.patch_size] * 3) != pre.patch_size:
            raise ValueError(f"--patch-size {s.patch_size} differs from the encoder's patch size {pre.patch_size} "
                             f"({s.encoder}); the patch size is fixed by pre-training")
        cfg = pre.encoder_config(roi, num_heads=s.num_heads)
        model = UNETR(cfg, out_channels, feature_size=s.feature_size)
        report = load_encoder(model, pre, verbose=not s.quiet)
        origin = {"encoder": str(s.encoder), "layout": pre.source_format,
                  "objective": pre.config.objective if pre.config else "release",
                  "loaded": len(report.loaded), "adapted": report.adapted}
    else:
        over = {"img_size": roi}
        if s.patch_size:
            over["patch_size"] = s.patch_size
        if s.num_heads:
            over["num_heads"] = s.num_heads
        cfg = get_config(s.model, **over)
        model = UNETR(cfg, out_channels, feature_size=s.feature_size)
        origin = {"encoder": None, "layout": "scratch", "objective": "scratch"}
    return model, origin


def layer_decay_param_groups(model: UNETR, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups: per encoder layer an lr scale ``layer_decay^(depth + 1 - layer)``, decoder scale 1;
    no weight decay on norms, biases, tokens and position embeddings (``train.optim.param_groups``' rule)."""
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"--layer-decay must be in (0, 1], got {layer_decay}")
    top = model.encoder_config.depth + 1
    return param_groups(model, weight_decay, lr=lr, top_layer=top, layer_decay=layer_decay,
                        layer_of=lambda name: model.encoder_layer_id(name) if name.startswith("vit.") else top)


def finetune_step(model: UNETR, image: torch.Tensor, label: torch.Tensor, *, loss_fn, optimizer, scheduler,
                  clip_grad: float) -> tuple[float, float]:
    """One optimiser step on a batch: Dice+CE, backward, clip, optimiser and scheduler step. -> loss, grad norm."""
    loss = loss_fn(model(image), label)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = clip_gradients(model.parameters(), clip_grad)
    optimizer.step()
    scheduler.step()
    return float(loss.detach()), float(grad_norm)


@torch.no_grad()
def validate(model: UNETR, cases: list[dict], names: dict[int, str], roi_size: Sequence[int], *,
             overlap: float = 0.25) -> dict[str, Any]:
    """Sliding-window prediction of each preprocessed validation case; per-class and mean Dice."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    per_class: dict[str, list[float]] = {n: [] for n in names.values()}
    for case in cases:
        x = torch.as_tensor(case[IMAGE]).as_subclass(torch.Tensor)[None].to(device)  # [1, 1, X, Y, Z]
        logits = sliding_window_inference(x, tuple(roi_size), 1, model, overlap=overlap, mode="gaussian")
        pred = torch.as_tensor(logits).argmax(1)[0].cpu().numpy()
        ref = torch.as_tensor(case[LABEL]).as_subclass(torch.Tensor)[0].cpu().numpy().round().astype(np.int64)
        for idx, name in names.items():
            d = dice_score(pred == idx, ref == idx)
            if not math.isnan(d):
                per_class[name].append(d)
    model.train(was_training)
    means = {n: float(np.mean(v)) for n, v in per_class.items() if v}
    return {"dice": float(np.mean(list(means.values()))) if means else float("nan"), "dice_per_class": means}


def plot_curves(history: dict[str, list], path: str | Path, title: str = "finetune") -> Path:
    """Loss (per step) and validation Dice (per evaluation) as a two-panel PNG."""
    import matplotlib  # lazy: heavy, loaded only when the curves are drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    if history.get("loss"):
        steps, losses = zip(*history["loss"])
        ax1.plot(steps, losses, lw=0.8, color="tab:blue", alpha=0.5, label="step")
        if len(losses) >= 5:
            k = max(2, len(losses) // 20)
            smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
            ax1.plot(steps[k - 1:], smooth, color="tab:blue", lw=1.8, label=f"mean of {k}")
        ax1.legend(fontsize=8)
    ax1.set(xlabel="step", ylabel="Dice + CE loss", title="training loss")
    if history.get("val"):
        vsteps = [v["step"] for v in history["val"]]
        ax2.plot(vsteps, [v["dice"] for v in history["val"]], "o-", color="k", lw=1.8, label="mean")
        classes = sorted({c for v in history["val"] for c in v.get("dice_per_class", {})})
        for c in classes:
            ax2.plot(vsteps, [v.get("dice_per_class", {}).get(c, np.nan) for v in history["val"]], lw=0.9, label=c)
        ax2.legend(fontsize=7, ncol=2)
    ax2.set(xlabel="step", ylabel="Dice", title="validation Dice", ylim=(0, 1))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        return save_figure(fig, path, dpi=100)  # atomic, as every PNG writer
    finally:
        plt.close(fig)


# ============================================================== the run
def resume_checkpoint(resume: str | None, out: Path) -> Path | None:
    """The checkpoint ``--resume`` names: ``auto`` is ``OUT/last.pt`` if there is one (as pretrain's)."""
    last = out / LAST_NAME
    if resume == "auto":
        return last if last.is_file() else None
    if resume:
        path = Path(resume).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--resume: checkpoint not found: {path}")
        return path
    return None


def run(settings: FinetuneSettings) -> dict[str, Any]:
    """The whole fine-tuning run with ``settings`` (checked here); returns a summary (also the ``done`` event)."""
    s = settings.check()
    out = Path(s.out)
    if s.threads:
        torch.set_num_threads(int(s.threads))
    torch.manual_seed(s.seed)
    np.random.seed(s.seed % (2 ** 32))
    roi = s.roi_size()
    spacing = s.resample_spacing()

    # ---- cases and labels
    data = task_cases(s)
    task, source = data.task, data.source
    pre = preprocess_transforms(task, source, spacing_mm=spacing, roi_size=roi, load=data.load)
    train_cases = preprocess_cases(data.train, pre)
    val_cases = preprocess_cases(data.val, pre)
    augment = augment_transforms(roi, num_samples=s.crops_per_case, pos=s.pos, neg=s.neg)

    # ---- network, optimiser
    device = resolve_device(s.device)
    model, origin = build_network(s, task.num_classes, roi)
    model.freeze_encoder(bool(s.freeze_encoder))
    model.to(device)
    groups = layer_decay_param_groups(model, s.lr, s.weight_decay, s.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.999))
    warmup = s.warmup_steps if s.warmup_steps < s.steps else s.steps // 10  # a warmup longer than the run
    scheduler = build_scheduler(optimizer, warmup, s.steps)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    # ---- resume
    history: dict[str, Any] = {"loss": [], "val": []}
    start, best = 0, -1.0
    resume_path = resume_checkpoint(s.resume, out)
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path)
        if (ckpt.get("extra") or {}).get("task") != SEG_TASK:
            raise ValueError(f"{resume_path} is not a fine-tuning checkpoint")
        start = restore_training_state(ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
        history = ckpt["extra"].get("history", history)
        best = float(ckpt["extra"].get("best_dice", -1.0))
    elif (out / LAST_NAME).exists():
        raise ValueError(f"{out} already holds a run ({LAST_NAME}); pass --resume auto to continue it or choose "
                         "another --out")

    make_output_dir(out)  # removed again if the run fails while it is still empty

    def extra() -> dict[str, Any]:
        return {"task": SEG_TASK, "architecture": model.architecture(), "labels": task.to_dict(),
                "source_labels": source.to_dict() if source else None,
                "spacing_mm": [float(spacing)] * 3 if spacing else None, "hu_window": [float(w) for w in HU_WINDOW],
                "roi_size": list(roi), "origin": origin, "label_fraction": s.label_fraction,
                "train_cases": [c["name"] for c in data.train], "num_train_cases_available": data.available,
                "val_cases": [c["name"] for c in data.val], "history": history, "best_dice": best}

    ckpt_kwargs = dict(model=model, optimizer=optimizer, scheduler=scheduler, config=model.encoder_config,
                       train_config=s.to_dict())
    reporter = ProgressReporter("finetune", s.steps, json_lines=s.progress_json, initial=start)
    reporter.start(out=str(out), classes=task.names, train_cases=len(train_cases), val_cases=len(val_cases),
                   label_fraction=s.label_fraction, encoder=origin["encoder"], resumed_from=start)
    if start == 0:  # the untrained network's score: the curve's first point and the baseline
        val0 = validate(model, val_cases, task.names, roi)
        history["val"].append({"step": 0, **val0})
        reporter.progress(0, dice=val0["dice"], dice_per_class=val0["dice_per_class"])

    # ---- the loop
    model.train()
    t0 = time.time()
    step = start
    try:
        for step in range(start + 1, s.steps + 1):
            image, label = step_batch(train_cases, augment, step, s.batch_size, s.crops_per_case, s.seed)
            loss_value, grad_norm = finetune_step(model, image.to(device), label.to(device), loss_fn=loss_fn,
                                                  optimizer=optimizer, scheduler=scheduler, clip_grad=s.clip_grad)
            history["loss"].append([step, loss_value])
            metrics: dict[str, Any] = {"loss": loss_value, "lr": optimizer.param_groups[-1]["lr"],
                                       "grad_norm": grad_norm}
            if step % s.val_every == 0 or step == s.steps:
                val = validate(model, val_cases, task.names, roi)
                history["val"].append({"step": step, **val})
                metrics.update(dice=val["dice"], dice_per_class=val["dice_per_class"])
                if val["dice"] > best:
                    best = val["dice"]
                    save_checkpoint(out / "best.pt", step=step, extra=extra(), **ckpt_kwargs)
            reporter.progress(step, **metrics)
            if step % s.checkpoint_every == 0 or step == s.steps:
                path = save_training_checkpoint(out, step=step, keep_last=s.keep_last, extra=extra(), **ckpt_kwargs)
                reporter.checkpoint(step, str(path))
    except KeyboardInterrupt:
        path = save_training_checkpoint(out, step=step, keep_last=s.keep_last, extra=extra(), **ckpt_kwargs)
        reporter.error(f"interrupted at step {step}; resume with --resume (checkpoint {path})")
        raise

    # ---- outputs
    curves = plot_curves(history, out / "curves.png",
                         title=f"finetune {origin['objective']} encoder, label fraction {s.label_fraction}")
    (out / "history.json").write_text(json.dumps(history) + "\n")
    final = history["val"][-1] if history["val"] else {}
    summary = {"out": str(out), "checkpoint": str(out / LAST_NAME), "best_checkpoint": str(out / "best.pt"),
               "curves": str(curves), "steps": s.steps, "untrained_dice": history["val"][0]["dice"],
               "final_dice": final.get("dice"),
               "final_dice_per_class": final.get("dice_per_class"), "best_dice": best,
               "seconds": round(time.time() - t0, 1), "train_cases": len(train_cases)}
    reporter.done(**summary)
    return summary
