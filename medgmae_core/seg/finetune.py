"""Fine-tuning UNETR segmentation from a pre-trained (or no) encoder: ``run(FinetuneSettings)`` (``medgmae finetune``).

Data: a MONAI datalist JSON (``{"training": [{"image": ..., "label": ...}], "validation": [...]}``),
``--case IMAGE LABEL`` pairs, or ``phantom:N`` (generated phantoms with their labels). A source label
map (``--label-map``, e.g. TotalSegmentator's ``labels_total_v2.json``) names the label ids and
``--classes`` picks the task's classes (``liver,spleen,kidneys=kidney_left+kidney_right``), which get
contiguous ids 1..K. ``--label-fraction`` keeps that share of the training cases (at least one),
chosen by a permutation seeded with ``--seed``.

Pipeline (pre-training's, with a label key): load, RAS, same-grid check, label remap, CT check,
spacing (bilinear / nearest), HU window, foreground crop, pad; then per step
``RandCropByPosNegLabeld`` on the label, flips and rot90. Step ``s``'s batch depends only on
(seed, s), so a resumed run sees the batches an uninterrupted one would.

Optimisation: Dice+CE, AdamW with layer-wise lr decay over the encoder (block i gets
``lr * decay^(depth + 1 - layer)``), warmup + cosine, gradient clipping; ``--freeze-encoder`` trains the
decoder only. Checkpoints are the one format (``train.checkpoint``: atomic ``step_*.pt`` + ``last.pt``,
``best.pt`` by validation Dice) with the label names, spacing and UNETR architecture in ``extra``.
Progress is JSON lines (``--progress-json``); ``curves.png`` plots loss and validation Dice.
"""
from __future__ import annotations

import json
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.transforms import (Compose, CropForegroundd, EnsureChannelFirstd, EnsureTyped, Orientationd,
                              RandCropByPosNegLabeld, RandFlipd, RandRotate90d, ScaleIntensityRanged, Spacingd,
                              SpatialPadd)

from ..data.datasets import derive_seed, parse_phantom_spec
from ..data.phantom import LABEL_NAMES, make_phantom
from ..data.transforms import HU_WINDOW, EnsureCTd, LoadCTd
from ..data.volumes import read_datalist
from ..errors import make_output_dir
from ..export.figures import save_figure
from ..model.configs import get_config
from ..progress import ProgressReporter
from ..train.checkpoint import (LAST_NAME, load_checkpoint, restore_training_state, save_checkpoint,
                                save_training_checkpoint)
from ..train.distributed import resolve_device
from ..train.optim import build_scheduler, clip_gradients, param_groups
from .evaluate import dice_score
from .labels import LabelMap, check_label_ids, class_lookup
from .transfer import load_encoder, read_pretrained
from .unetr import UNETR

log = logging.getLogger(__name__)

IMAGE, LABEL = "image", "label"
SEG_TASK = "segmentation"


# ============================================================== settings
@dataclass
class FinetuneSettings:
    """Every setting of a fine-tuning run (python names of ``medgmae finetune``'s flags; ``commands.options``)."""

    out: str = ""                      # run folder: step_*.pt, last.pt, best.pt, curves.png, history.json
    # data
    data: str | None = None            # datalist JSON or phantom[:N]
    cases: list = field(default_factory=list)   # [(image, label), ...] instead of ``data``
    label_map: str | None = None
    classes: str | None = None
    label_fraction: float = 1.0
    val_fraction: float = 0.2
    spacing_mm: float | None = 1.5     # <= 0 or None: keep the input spacing
    img_size: Any = 96                 # crop / sliding-window size: N or (D, H, W)
    crops_per_case: int = 2
    pos: float = 3.0
    neg: float = 1.0
    phantom_shape: Any = (96, 96, 64)
    phantom_spacing: float = 3.0
    # model
    encoder: str | None = None         # pre-trained checkpoint; None: train from scratch
    model: str = "tiny"                # encoder size when training from scratch
    patch_size: int | None = None
    num_heads: int | None = None
    feature_size: int = 16
    freeze_encoder: bool = False
    # optimisation
    steps: int = 1000
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 1e-5
    layer_decay: float = 0.75
    warmup_steps: int = 50
    clip_grad: float = 1.0
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    # output
    val_every: int = 100
    checkpoint_every: int = 200
    keep_last: int = 2
    resume: str | None = None          # "auto" (OUT/last.pt) or a checkpoint path
    progress_json: bool = False
    quiet: bool = False

    def check(self) -> "FinetuneSettings":
        """Errors name the flag; returns ``self``."""
        if not self.out:
            raise ValueError("--out: give the run folder")
        for name in ("steps", "batch_size", "val_every", "checkpoint_every", "crops_per_case"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain, weights-only-loadable values (the checkpoint's ``train_config``)."""
        return {k: plain_value(v) for k, v in asdict(self).items()}


# ============================================================== data
def select_fraction(n: int, fraction: float, seed: int) -> list[int]:
    """Indices of ``max(1, round(fraction * n))`` of ``n`` training cases, a seeded choice (sorted)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"--label-fraction must be in (0, 1], got {fraction}")
    if n < 1:
        raise ValueError("no training cases")
    k = max(1, int(round(fraction * n)))
    return sorted(int(i) for i in np.random.default_rng([int(seed), 7919]).permutation(n)[:k])


class RemapLabelsd:
    """Check a label volume's ids against the source map, then map them to the task's ids."""

    def __init__(self, task: LabelMap, source: LabelMap | None) -> None:
        self.task, self.source = task, source
        self.lut = torch.as_tensor(class_lookup(task, source))

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        lab = d[LABEL]
        name = d.get("name", "label volume")
        values = torch.as_tensor(lab).as_subclass(torch.Tensor)
        if torch.any(values != torch.round(values)) or values.min() < 0:
            raise ValueError(f"{name}: the label volume holds non-integer or negative values (is it a label map?)")
        ints = values.long()
        if self.source is not None:
            check_label_ids(torch.unique(ints).numpy(), self.source, origin=f"{name}: label volume")
        if ints.max() >= self.lut.numel():
            raise ValueError(f"{name}: label id {int(ints.max())} is beyond the label map")
        mapped = self.lut[ints].to(torch.float32)
        d[LABEL] = lab.clone().copy_(mapped) if hasattr(lab, "meta") else mapped
        return d


class CheckSameGridd:
    """Clear error when a case's image and label are not on the same voxel grid."""

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        img, lab = data[IMAGE], data[LABEL]
        name = data.get("name", "case")
        if tuple(img.shape[1:]) != tuple(lab.shape[1:]):
            raise ValueError(f"{name}: image shape {tuple(img.shape[1:])} and label shape {tuple(lab.shape[1:])} "
                             "differ; image and label must share one voxel grid")
        a = np.asarray(getattr(img, "affine", np.eye(4)), dtype=np.float64)
        b = np.asarray(getattr(lab, "affine", np.eye(4)), dtype=np.float64)
        if not np.allclose(a, b, atol=1e-3 * max(1.0, float(np.abs(a).max()))):
            raise ValueError(f"{name}: image and label affines differ (origin {np.round(a[:3, 3], 2).tolist()} vs "
                             f"{np.round(b[:3, 3], 2).tolist()}, spacing {np.round(np.linalg.norm(a[:3, :3], axis=0), 3).tolist()} "
                             f"vs {np.round(np.linalg.norm(b[:3, :3], axis=0), 3).tolist()}); image and label must "
                             "share one voxel grid")
        return data


def preprocess_transforms(task: LabelMap, source: LabelMap | None, *, spacing_mm: Sequence[float] | float | None,
                          roi_size: Sequence[int], load: bool = True,
                          window: tuple[float, float] | None = None):
    """Deterministic part: pre-training's steps 1-5 with a label key (nearest resampling for labels)."""
    window = window or HU_WINDOW
    keys = [IMAGE, LABEL]
    steps: list[Any] = [LoadCTd(IMAGE), LoadCTd(LABEL), EnsureChannelFirstd(keys=keys)] if load else []
    # RAS first: a label exported with flipped or permuted axes (e.g. a DICOM series' NIfTI labels)
    # then lies on the image's grid; anything else is a real mismatch
    steps += [Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
              CheckSameGridd(), RemapLabelsd(task, source),
              EnsureCTd(keys=IMAGE, spacing_mm=spacing_mm if load else None)]  # + size guard before Spacingd
    if spacing_mm is not None:
        sp = tuple(spacing_mm) if isinstance(spacing_mm, (list, tuple)) else (float(spacing_mm),) * 3
        steps.append(Spacingd(keys=keys, pixdim=sp, mode=("bilinear", "nearest")))
    steps += [
        ScaleIntensityRanged(keys=IMAGE, a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(keys=keys, source_key=IMAGE, allow_smaller=True),
        SpatialPadd(keys=keys, spatial_size=tuple(roi_size), mode="constant"),
        EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False),
    ]
    return Compose(steps)


def augment_transforms(roi_size: Sequence[int], *, num_samples: int, pos: float, neg: float,
                       flip_prob: float = 0.2, rot90_prob: float = 0.2):
    """Random part: crops centred on labelled voxels ``pos : neg``, flips on each axis and rot90."""
    keys = [IMAGE, LABEL]
    return Compose([
        RandCropByPosNegLabeld(keys=keys, label_key=LABEL, spatial_size=tuple(roi_size), pos=pos, neg=neg,
                               num_samples=num_samples, image_key=IMAGE, image_threshold=0.0),
        RandFlipd(keys=keys, prob=flip_prob, spatial_axis=0),
        RandFlipd(keys=keys, prob=flip_prob, spatial_axis=1),
        RandFlipd(keys=keys, prob=flip_prob, spatial_axis=2),
        RandRotate90d(keys=keys, prob=rot90_prob, max_k=3, spatial_axes=(0, 1)),
    ])


def phantom_label_cases(n: int, shape: Sequence[int], spacing_mm: float, seed: int) -> tuple[list[dict], LabelMap]:
    """``n`` generated phantoms with their label volumes, as in-memory channel-first cases."""
    if n < 1:
        raise ValueError(f"number of phantoms must be >= 1, got {n}")
    cases = []
    for i in range(n):
        ph = make_phantom(tuple(int(s) for s in shape), spacing_mm=spacing_mm, seed=seed + i)
        aff = torch.as_tensor(ph.affine)
        cases.append({IMAGE: MetaTensor(torch.from_numpy(ph.hu)[None], affine=aff),
                      LABEL: MetaTensor(torch.from_numpy(ph.labels.astype(np.float32))[None], affine=aff.clone()),
                      "name": f"phantom_{seed + i:04d}"})
    return cases, LabelMap({k: v for k, v in LABEL_NAMES.items() if k != 0})


def datalist_cases(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(training, validation) cases of a MONAI datalist JSON with ``image`` and ``label`` paths
    (``data.volumes.read_datalist``, the one parser); every path must exist."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"datalist not found: {path}")
    out = []
    for key in ("training", "validation"):
        cases = read_datalist(path, key, fields=(IMAGE, LABEL), missing_ok=True)
        for i, case in enumerate(cases):
            for k in (IMAGE, LABEL):
                if not Path(case[k]).exists():
                    raise FileNotFoundError(f"{path}: {key}[{i}] {k} not found: {case[k]}")
        out.append(cases)
    if not out[0]:
        raise ValueError(f"{path}: the datalist has no 'training' cases")
    return out[0], out[1]


def split_validation(cases: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out ``val_fraction`` of the cases (at least one, if there are two or more)."""
    if len(cases) < 2 or val_fraction <= 0:
        return cases, []
    k = min(len(cases) - 1, max(1, int(round(val_fraction * len(cases)))))
    order = np.random.default_rng([int(seed), 104729]).permutation(len(cases))
    val = sorted(int(i) for i in order[:k])
    return [c for i, c in enumerate(cases) if i not in val], [cases[i] for i in val]


def preprocess_cases(cases: list[dict], transform) -> list[dict]:
    """Run the deterministic pipeline once per case (kept in memory); errors name the case."""
    out = []
    for case in cases:
        try:
            item = transform(dict(case))
        except Exception as exc:  # MONAI wraps errors; surface the first line with the case name
            msg = str(exc)
            inner = exc.__cause__ or exc.__context__
            while inner is not None and not isinstance(inner, ValueError):
                inner = inner.__cause__ or inner.__context__
            msg = str(inner) if inner is not None else msg
            name = case.get("name", "case")
            raise ValueError(msg if str(name) in msg else f"{name}: {msg}") from None
        item["name"] = case.get("name", "case")
        out.append(item)
    return out


# ============================================================== batches
def step_batch(cases: list[dict], augment, step: int, batch_size: int, crops_per_case: int,
               seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The crops of step ``step``: a pure function of (seed, step). -> image, label ``[B, 1, *roi]``."""

    rng = np.random.default_rng([int(seed), int(step)])
    images, labels = [], []
    j = 0
    while len(images) < batch_size:
        case = cases[int(rng.integers(len(cases)))]
        augment.set_random_state(seed=derive_seed(seed, step, j))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Num foregrounds")
            crops = augment({IMAGE: case[IMAGE], LABEL: case[LABEL]})
        for c in crops[: batch_size - len(images)]:
            images.append(torch.as_tensor(c[IMAGE]).as_subclass(torch.Tensor).float())
            labels.append(torch.as_tensor(c[LABEL]).as_subclass(torch.Tensor).float())
        j += 1
    return torch.stack(images), torch.stack(labels)


# ============================================================== optimisation
def layer_decay_param_groups(model: UNETR, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups: per encoder layer an lr scale ``layer_decay^(depth + 1 - layer)``, decoder scale 1;
    no weight decay on norms, biases, tokens and position embeddings (``train.optim.param_groups``' rule)."""
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"--layer-decay must be in (0, 1], got {layer_decay}")
    top = model.encoder_config.depth + 1
    return param_groups(model, weight_decay, lr=lr, top_layer=top, layer_decay=layer_decay,
                        layer_of=lambda name: model.encoder_layer_id(name) if name.startswith("vit.") else top)


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

    import matplotlib  # matplotlib: heavy, loaded only to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
def build_network(args: FinetuneSettings, out_channels: int, roi: tuple[int, int, int]) -> tuple[UNETR, dict]:
    """UNETR (+ pre-trained encoder if ``--encoder``), and a description of the encoder's origin."""

    if args.encoder:
        pre = read_pretrained(args.encoder)
        if args.patch_size and tuple([args.patch_size] * 3) != pre.patch_size:
            raise ValueError(f"--patch-size {args.patch_size} differs from the encoder's patch size {pre.patch_size} "
                             f"({args.encoder}); the patch size is fixed by pre-training")
        cfg = pre.encoder_config(roi, num_heads=args.num_heads)
        model = UNETR(cfg, out_channels, feature_size=args.feature_size)
        report = load_encoder(model, pre, verbose=not args.quiet)
        origin = {"encoder": str(args.encoder), "layout": pre.source_format,
                  "objective": pre.config.objective if pre.config else "release",
                  "loaded": len(report.loaded), "adapted": report.adapted}
    else:
        over = {"img_size": roi}
        if args.patch_size:
            over["patch_size"] = args.patch_size
        if args.num_heads:
            over["num_heads"] = args.num_heads
        cfg = get_config(args.model, **over)
        model = UNETR(cfg, out_channels, feature_size=args.feature_size)
        origin = {"encoder": None, "layout": "scratch", "objective": "scratch"}
    return model, origin


def plain_value(value: Any) -> Any:
    """Settings as weights-only-loadable plain values (lists for tuples, strings for anything else)."""
    if isinstance(value, (int, float, str, bool, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    return str(value)


def _roi(value: Sequence[int] | int) -> tuple[int, int, int]:
    v = list(value) if isinstance(value, (list, tuple)) else [value]
    v = v * 3 if len(v) == 1 else v
    if len(v) != 3 or min(v) < 1:
        raise ValueError(f"--img-size must be one or three positive ints, got {value}")
    return tuple(int(x) for x in v)  # type: ignore[return-value]


def run(args: FinetuneSettings) -> dict[str, Any]:
    """The whole fine-tuning run with ``args`` (checked here); returns a summary (also the ``done`` event)."""
    args.check()
    out = Path(args.out)
    if args.threads:
        torch.set_num_threads(int(args.threads))
    torch.manual_seed(args.seed)
    np.random.seed(args.seed % (2 ** 32))
    roi = _roi(args.img_size)
    spacing = None if args.spacing_mm is not None and args.spacing_mm <= 0 else args.spacing_mm

    # ---- cases and labels
    n_phantoms = parse_phantom_spec(args.data) if args.data else None
    val_cases_raw: list[dict] = []
    if n_phantoms:
        cases, source = phantom_label_cases(n_phantoms, args.phantom_shape, args.phantom_spacing, args.seed)
        load = False
    else:
        if args.data:
            cases, val_cases_raw = datalist_cases(args.data)
        else:
            cases = [{IMAGE: str(i), LABEL: str(l), "name": str(i)} for i, l in (args.cases or [])]
        if not cases:
            raise ValueError("no training data: give --data DATALIST.json | phantom:N, or --case IMAGE LABEL")
        for c in cases:
            for k in (IMAGE, LABEL):
                if not Path(c[k]).exists():
                    raise FileNotFoundError(f"{k} not found: {c[k]}")
        source = LabelMap.from_json(args.label_map) if args.label_map else None
        load = True
    if args.label_map and n_phantoms:
        source = LabelMap.from_json(args.label_map)
    if source is None and not args.classes:
        raise ValueError("--label-map is needed to name the label ids (or give --classes as ids)")
    task = source.select(args.classes) if source is not None else LabelMap(
        {k: f"label_{i}" for k, i in enumerate((int(c) for c in args.classes.split(",")), start=1)},
        {k: (int(i),) for k, i in enumerate((int(c) for c in args.classes.split(",")), start=1)})
    if not val_cases_raw:
        cases, val_cases_raw = split_validation(cases, args.val_fraction, args.seed)
    all_train = len(cases)
    chosen = select_fraction(all_train, args.label_fraction, args.seed)
    train_raw = [cases[i] for i in chosen]
    if not val_cases_raw:
        log.warning("no validation cases (one case only): validating on the training case")
        val_cases_raw = train_raw[:1]

    pre = preprocess_transforms(task, source, spacing_mm=spacing, roi_size=roi, load=load)
    train_cases = preprocess_cases(train_raw, pre)
    val_cases = preprocess_cases(val_cases_raw, pre)
    augment = augment_transforms(roi, num_samples=args.crops_per_case, pos=args.pos, neg=args.neg)

    # ---- network, optimiser

    device = resolve_device(args.device)
    model, origin = build_network(args, task.num_classes, roi)
    model.freeze_encoder(bool(args.freeze_encoder))
    model.to(device)
    groups = layer_decay_param_groups(model, args.lr, args.weight_decay, args.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999))
    warmup = args.warmup_steps if args.warmup_steps < args.steps else args.steps // 10  # a warmup longer than the run
    scheduler = build_scheduler(optimizer, warmup, args.steps)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    train_config = args.to_dict()
    history: dict[str, Any] = {"loss": [], "val": []}
    start, best = 0, -1.0
    last = out / LAST_NAME
    resume_path = None
    if args.resume == "auto":  # continue OUT/last.pt if there is one (as pretrain's --resume auto)
        resume_path = last if last.is_file() else None
    elif args.resume:
        resume_path = Path(args.resume).expanduser()
        if not resume_path.is_file():
            raise FileNotFoundError(f"--resume: checkpoint not found: {resume_path}")
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path)
        if (ckpt.get("extra") or {}).get("task") != SEG_TASK:
            raise ValueError(f"{resume_path} is not a fine-tuning checkpoint")
        start = restore_training_state(ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
        history = ckpt["extra"].get("history", history)
        best = float(ckpt["extra"].get("best_dice", -1.0))
    elif last.exists():
        raise ValueError(f"{out} already holds a run ({LAST_NAME}); pass --resume auto to continue it or choose "
                         "another --out")

    make_output_dir(out)  # removed again if the run fails while it is still empty

    def extra() -> dict[str, Any]:
        return {"task": SEG_TASK, "architecture": model.architecture(), "labels": task.to_dict(),
                "source_labels": source.to_dict() if source else None,
                "spacing_mm": [float(spacing)] * 3 if spacing else None, "hu_window": [-175.0, 250.0],
                "roi_size": list(roi), "origin": origin, "label_fraction": args.label_fraction,
                "train_cases": [c["name"] for c in train_raw], "num_train_cases_available": all_train,
                "val_cases": [c["name"] for c in val_cases_raw], "history": history, "best_dice": best}

    ckpt_kwargs = dict(model=model, optimizer=optimizer, scheduler=scheduler, config=model.encoder_config,
                       train_config=train_config)
    reporter = ProgressReporter("finetune", args.steps, json_lines=args.progress_json, initial=start)
    reporter.start(out=str(out), classes=task.names, train_cases=len(train_cases), val_cases=len(val_cases),
                   label_fraction=args.label_fraction, encoder=origin["encoder"], resumed_from=start)
    if start == 0:  # the untrained network's score: the curve's first point and the baseline
        val0 = validate(model, val_cases, task.names, roi)
        history["val"].append({"step": 0, **val0})
        reporter.progress(0, dice=val0["dice"], dice_per_class=val0["dice_per_class"])
    model.train()
    t0 = time.time()
    step = start
    try:
        for step in range(start + 1, args.steps + 1):
            image, label = step_batch(train_cases, augment, step, args.batch_size, args.crops_per_case, args.seed)
            image, label = image.to(device), label.to(device)
            loss = loss_fn(model(image), label)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = clip_gradients(model.parameters(), args.clip_grad)
            optimizer.step()
            scheduler.step()
            loss_value = float(loss.detach())
            history["loss"].append([step, loss_value])
            metrics: dict[str, Any] = {"loss": loss_value, "lr": optimizer.param_groups[-1]["lr"],
                                       "grad_norm": float(grad_norm)}
            if step % args.val_every == 0 or step == args.steps:
                val = validate(model, val_cases, task.names, roi)
                history["val"].append({"step": step, **val})
                metrics.update(dice=val["dice"], dice_per_class=val["dice_per_class"])
                if val["dice"] > best:
                    best = val["dice"]
                    save_checkpoint(out / "best.pt", step=step, extra=extra(), **ckpt_kwargs)
            reporter.progress(step, **metrics)
            if step % args.checkpoint_every == 0 or step == args.steps:
                path = save_training_checkpoint(out, step=step, keep_last=args.keep_last, extra=extra(), **ckpt_kwargs)
                reporter.checkpoint(step, str(path))
    except KeyboardInterrupt:
        path = save_training_checkpoint(out, step=step, keep_last=args.keep_last, extra=extra(), **ckpt_kwargs)
        reporter.error(f"interrupted at step {step}; resume with --resume (checkpoint {path})")
        raise
    curves = plot_curves(history, out / "curves.png",
                         title=f"finetune {origin['objective']} encoder, label fraction {args.label_fraction}")
    (out / "history.json").write_text(json.dumps(history) + "\n")
    final = history["val"][-1] if history["val"] else {}
    summary = {"out": str(out), "checkpoint": str(out / LAST_NAME), "best_checkpoint": str(out / "best.pt"),
               "curves": str(curves), "steps": args.steps, "untrained_dice": history["val"][0]["dice"],
               "final_dice": final.get("dice"),
               "final_dice_per_class": final.get("dice_per_class"), "best_dice": best,
               "seconds": round(time.time() - t0, 1), "train_cases": len(train_cases)}
    reporter.done(**summary)
    return summary
