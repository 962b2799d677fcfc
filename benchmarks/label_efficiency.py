"""Label efficiency: UNETR from scratch vs a voxel-MAE encoder vs a MedGMAE encoder, at a small and a
full label fraction (the paper's Table of DSC at 1% / 10% / 100% labels, at a scale a CPU can do).

    python benchmarks/label_efficiency.py --out results/label_efficiency.json
    python benchmarks/label_efficiency.py --out r.json --encoder-gaussian g.pt --encoder-voxel v.pt \\
        --spacing 1.5 --roi 96 --patch-size 12 --finetune-steps 20000 --fractions 0.01 0.1 1.0 --device cuda

Data (CPU default): generated phantoms with labels (liver, spleen, kidneys) plus the real CT
``example_ct`` with its TotalSegmentator labels form the labelled training pool; held-out phantoms
and the real DICOM series (another patient, with its TotalSegmentator labels) are the validation set.
Phantom labels are renamed into TotalSegmentator ids so one label map names every case.

Without ``--encoder-*`` the two encoders are pre-trained here by short ``medgmae pretrain`` runs (same
data, steps, seed; objectives ``gaussian`` and ``voxel``). Each (encoder, fraction) pair is fine-tuned
with the same steps once per ``--seeds`` entry; the table reports the mean and spread over seeds of
the final validation Dice.
Numbers are what they are: at CPU scale pre-training is short and differences may be small or reversed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import write_json  # noqa: E402

TS = (REPO / ".." / "shared" / "data" / "ct" / "totalsegmentator").resolve()
ORGANS = "liver,spleen,kidneys=kidney_left+kidney_right"


def write_phantoms(work: Path, n: int, shape: tuple[int, int, int], spacing: float, seed: int) -> list[dict]:
    """Phantom CTs and label maps (renamed into TotalSegmentator ids) as NIfTI cases."""
    import nibabel as nib

    from medgmae_core.data.phantom import LABEL_NAMES, make_phantom
    from medgmae_core.seg.labels import LabelMap

    total = LabelMap.from_json(TS / "labels_total_v2.json")
    by_name = {name: idx for idx, name in total.names.items()}
    lut = np.zeros(256, np.uint8)
    for idx, name in LABEL_NAMES.items():
        lut[idx] = by_name.get(name, 0)
    cases = []
    for i in range(n):
        ph = make_phantom(shape, spacing_mm=spacing, seed=seed + i)
        img, lab = work / f"phantom_{i:02d}_ct.nii.gz", work / f"phantom_{i:02d}_seg.nii.gz"
        nib.save(nib.Nifti1Image(np.round(ph.hu).astype(np.int16), ph.affine), str(img))
        nib.save(nib.Nifti1Image(lut[ph.labels], ph.affine), str(lab))
        cases.append({"image": str(img), "label": str(lab)})
    return cases


def pretrain(work: Path, objective: str, images: list[str], args: argparse.Namespace) -> Path:
    """A short ``medgmae pretrain`` run; returns its last checkpoint."""
    out = work / f"pretrain_{objective}"
    datalist = work / "pretrain_datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": p} for p in images]}))
    cmd = [sys.executable, "-m", "medgmae_core.cli", "pretrain", "--data", str(datalist), "--objective", objective,
           "--model", "tiny", "--img-size", str(args.pretrain_img_size), "--patch-size", str(args.patch_size),
           "--spacing-mm", str(args.spacing), "--steps", str(args.pretrain_steps), "--batch-size", "2",
           "--lr", str(args.pretrain_lr), "--seed", str(args.seed), "--out-dir", str(out), "--progress-json",
           "--checkpoint-every", str(args.pretrain_steps), "--device", args.device]
    t0 = time.time()
    print(f"pretraining {objective}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pretrain {objective} failed:\n{proc.stderr[-3000:]}")
    losses = [json.loads(x).get("loss") for x in proc.stdout.splitlines()
              if x.startswith("{") and json.loads(x).get("event") == "progress"]
    losses = [v for v in losses if isinstance(v, (int, float))]
    print(f"  {objective}: {time.time() - t0:.0f} s, loss {losses[:1]} -> {losses[-1:]}", file=sys.stderr)
    ckpt = out / "last.pt"
    if not ckpt.exists():
        raise RuntimeError(f"pretrain {objective} wrote no {ckpt}")
    return ckpt


def finetune_one(work: Path, datalist: Path, encoder: Path | None, fraction: float, name: str, seed: int,
                 args: argparse.Namespace) -> dict:
    from medgmae_core.commands import finetune as finetune_command
    from medgmae_core.seg import finetune

    parser = argparse.ArgumentParser()
    finetune_command.add_arguments(parser)
    tag = f"{name}_{fraction:g}_seed{seed}"
    out = work / f"ft_{tag}"
    argv = ["--data", str(datalist), "--label-map", str(TS / "labels_total_v2.json"), "--classes", ORGANS,
            "--label-fraction", str(fraction), "--spacing", str(args.spacing), "--roi", str(args.roi),
            "--feature-size", str(args.feature_size), "--steps", str(args.finetune_steps),
            "--val-every", str(args.val_every), "--checkpoint-every", str(args.finetune_steps),
            "--lr", str(args.lr), "--warmup", str(max(1, args.finetune_steps // 20)), "--layer-decay",
            str(args.layer_decay), "--batch-size", "2", "--seed", str(seed), "--device", args.device,
            "--json-lines", "--quiet", "--out", str(out)]
    if encoder is not None:
        argv += ["--encoder", str(encoder)]
    else:
        argv += ["--patch-size", str(args.patch_size)]
    t0 = time.time()
    with open(work / f"ft_{tag}.jsonl", "w") as log, contextlib.redirect_stdout(log):
        summary = finetune.run(finetune_command.settings_from_args(parser.parse_args(argv)))  # progress JSON lines go to the log
    hist = json.loads((out / "history.json").read_text())
    final = hist["val"][-1]
    row = {"encoder": name, "label_fraction": fraction, "seed": seed, "train_cases": summary["train_cases"],
           "dice_final": final["dice"], "dice_best": max(v["dice"] for v in hist["val"][1:]),
           "dice_untrained": hist["val"][0]["dice"], "dice_per_class_final": final["dice_per_class"],
           "dice_curve": [[v["step"], v["dice"]] for v in hist["val"]], "seconds": round(time.time() - t0, 1)}
    print(f"  {name:8s} fraction {fraction:g} seed {seed}: Dice {row['dice_final']:.3f} "
          f"(best {row['dice_best']:.3f}) {row['seconds']:.0f} s", file=sys.stderr, flush=True)
    return row


def summarize(rows: list[dict]) -> dict:
    """Mean, sample standard deviation, min and max of the final Dice over seeds, per encoder@fraction."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault(f"{r['encoder']}@{r['label_fraction']:g}", []).append(r["dice_final"])
    return {key: {"mean": round(float(np.mean(v)), 4),
                  "std": round(float(np.std(v, ddof=1)), 4) if len(v) > 1 else None,
                  "min": round(float(min(v)), 4), "max": round(float(max(v)), 4), "seeds": len(v)}
            for key, v in groups.items()}


def bar_chart(rows: list[dict], path: Path, title: str) -> None:
    """Mean final Dice per encoder and fraction; whiskers span the seeds' min..max, dots are the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    encoders = list(dict.fromkeys(r["encoder"] for r in rows))
    fractions = sorted({r["label_fraction"] for r in rows})
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    width = 0.8 / len(encoders)
    colors = {"scratch": "0.6", "voxel": "tab:blue", "gaussian": "tab:orange"}
    for i, enc in enumerate(encoders):
        per_fraction = [[r["dice_final"] for r in rows if r["encoder"] == enc and r["label_fraction"] == f]
                        for f in fractions]
        means = np.array([np.mean(v) if v else np.nan for v in per_fraction])
        low = np.array([means[j] - min(v) if v else 0.0 for j, v in enumerate(per_fraction)])
        high = np.array([max(v) - means[j] if v else 0.0 for j, v in enumerate(per_fraction)])
        xs = np.arange(len(fractions)) + (i - (len(encoders) - 1) / 2) * width
        bars = ax.bar(xs, means, width, yerr=np.stack([low, high]), capsize=3, color=colors.get(enc),
                      label={"voxel": "voxel MAE", "gaussian": "MedGMAE"}.get(enc, enc))
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=8)
        for x, v in zip(xs, per_fraction):
            ax.plot([x] * len(v), v, "k.", markersize=3)
    ax.set_xticks(np.arange(len(fractions)), [f"{100 * f:g}% labels" for f in fractions])
    ax.set_ylabel("validation Dice (liver, spleen, kidneys)")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="results JSON (a bar chart PNG is written beside it)")
    p.add_argument("--work", help="working folder (default: <out>_work)")
    p.add_argument("--encoder-gaussian", help="pre-trained MedGMAE checkpoint (else pre-trained here)")
    p.add_argument("--encoder-voxel", help="pre-trained voxel-MAE checkpoint (else pre-trained here)")
    p.add_argument("--phantoms", type=int, default=8, help="phantoms in the labelled training pool")
    p.add_argument("--val-phantoms", type=int, default=2)
    p.add_argument("--phantom-shape", type=int, nargs=3, default=[96, 96, 64])
    p.add_argument("--phantom-spacing", type=float, default=3.0)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.2, 1.0])
    p.add_argument("--spacing", type=float, default=6.0, help="working spacing in mm (paper: 1.5)")
    p.add_argument("--roi", type=int, default=32, help="fine-tuning window (paper: 96)")
    p.add_argument("--patch-size", type=int, default=8, help="ViT patch size (paper: 12)")
    p.add_argument("--pretrain-img-size", type=int, default=48)
    p.add_argument("--pretrain-steps", type=int, default=150)
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--finetune-steps", type=int, default=60)
    p.add_argument("--val-every", type=int, default=20)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--layer-decay", type=float, default=0.75)
    p.add_argument("--feature-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="seed of the phantoms and of pre-training here")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="fine-tuning seeds (label subset, initialisation, batches); the table reports their spread")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    work = Path(args.work) if args.work else out.with_name(out.stem + "_work")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    cases = write_phantoms(work, args.phantoms + args.val_phantoms, tuple(args.phantom_shape),
                           args.phantom_spacing, args.seed)
    train = cases[: args.phantoms] + [{"image": str(TS / "example_ct.nii.gz"),
                                       "label": str(TS / "example_seg_fast_force_split.nii.gz")}]
    val = cases[args.phantoms:] + [{"image": str(TS / "example_ct_dicom"),
                                    "label": str(TS / "example_seg_dicom.nii.gz")}]
    datalist = work / "datalist.json"
    datalist.write_text(json.dumps({"training": train, "validation": val}, indent=1))

    encoders: dict[str, Path | None] = {"scratch": None}
    images = [c["image"] for c in train]
    encoders["voxel"] = Path(args.encoder_voxel) if args.encoder_voxel else pretrain(work, "voxel", images, args)
    encoders["gaussian"] = (Path(args.encoder_gaussian) if args.encoder_gaussian
                            else pretrain(work, "gaussian", images, args))

    # One line per finished fine-tune, so a stopped benchmark continues where it was (same --work); a row is
    # reused only if it was fine-tuned with the same settings and encoders.
    done_log = work / "rows.jsonl"
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "work", "seeds", "fractions")}
    logged = map(json.loads, done_log.read_text().splitlines() if done_log.exists() else [])
    done = {(r["encoder"], r["label_fraction"], r["seed"]): r for r in logged if r.pop("settings", None) == settings}
    rows = []
    for seed in args.seeds:
        for fraction in args.fractions:
            for name, enc in encoders.items():
                row = done.get((name, fraction, seed))
                if row is None:
                    row = finetune_one(work, datalist, enc, fraction, name, seed, args)
                    with open(done_log, "a") as f:
                        f.write(json.dumps({**row, "settings": settings}) + "\n")
                rows.append(row)

    result = {
        "benchmark": "label_efficiency",
        "classes": ORGANS,
        "training_pool": [Path(c["image"]).name for c in train],
        "validation": [Path(c["image"]).name for c in val],
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work")},
        "encoders": {k: (str(v) if v else None) for k, v in encoders.items()},
        "rows": rows,
        "table": summarize(rows),
        "total_seconds": round(time.time() - t0, 1),
        "note": f"CPU scale: tiny ViT, {args.finetune_steps} fine-tuning steps at {args.spacing:g} mm, "
                f"roi {args.roi}; seeds {args.seeds} (table: mean, sample std, min, max over seeds). "
                "Validation Dice is the mean over classes of the per-class mean over validation cases.",
    }
    write_json(out, result)
    chart = out.with_suffix(".png")
    pretraining = ("given encoders" if args.encoder_gaussian and args.encoder_voxel
                   else f"{args.pretrain_steps} pre-training steps")
    bar_chart(rows, chart, f"label efficiency (CPU scale: {pretraining}, {args.finetune_steps} fine-tuning "
                           f"steps, {len(args.seeds)} seed(s))")
    print(json.dumps(result["table"], indent=1))
    print(f"wrote {out} and {chart}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
