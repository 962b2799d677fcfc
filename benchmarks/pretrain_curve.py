"""Held-out quality along one pre-training run: is it still improving, and is the checkpoint noise larger
than the trend?

    python benchmarks/pretrain_curve.py RUN_DIR/step_*.pt [--label NAME] [--extra LABEL=CKPT ...]
        [--compare LABEL=GLOB ...] --out FILE.json

For every checkpoint, the masked-region gain over the constant baseline (``train.evaluation.evaluate_masked``:
the same fixed 75% masks as ``pretrain_quality.py``) on windows of the held-out chest CTA and on held-out
phantoms, the gain over the interpolation baseline, the median largest sigma and the phantom organ Dice;
``--extra`` adds labelled checkpoints (e.g. a weight average) to the table; ``--compare LABEL=GLOB`` evaluates
another run's checkpoints the same way (e.g. a recipe variant at matched steps). The PNG (beside ``--out``)
plots both gains against the step, the other runs dashed, and the interpolation baseline's gain dotted.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_json  # noqa: E402
from pretrain_quality import check_held_out  # noqa: E402

from medgmae_core.export.figures import save_figure  # noqa: E402
from medgmae_core.train import evaluation as ev  # noqa: E402
from medgmae_core.train.checkpoint import load_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CT = REPO / ".." / "shared" / "data" / "ct" / "totalsegmentator" / "chest_cta_pulmonary_ct_cropped.nii.gz"
KEYS = ("gain_db", "psnr", "psnr_constant", "psnr_interpolation", "gain_over_interpolation_db",
        "median_largest_sigma_vox", "dice_organs")


def evaluate(path: str, ct, phantoms) -> dict:
    model, _ = load_model(path)
    step = torch.load(path, map_location="cpu", weights_only=False).get("step")
    on_ct, on_phantoms = ev.evaluate_masked(model, ct), ev.evaluate_masked(model, phantoms)
    return {"checkpoint": str(path), "step": step,
            "ct": {k: on_ct[k] for k in KEYS if k in on_ct},
            "phantoms": {k: on_phantoms[k] for k in KEYS if k in on_phantoms}}


def plot(path: Path, rows: list[dict], extra: list[dict], compare: dict[str, list[dict]], label: str) -> None:
    from matplotlib.figure import Figure  # lazy: matplotlib is heavy

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    steps = [r["step"] for r in rows]
    for key, colour, name in (("ct", "tab:red", "held-out chest CTA"), ("phantoms", "tab:blue", "held-out phantoms")):
        ax.plot(steps, [r[key]["gain_db"] for r in rows], marker=".", color=colour, label=f"{label} ({name})")
        for label, other in compare.items():
            ax.plot([r["step"] for r in other], [r[key]["gain_db"] for r in other], marker="x", ls="--", color=colour,
                    label=f"{label} ({name})")
        first = rows[0][key]
        ax.axhline(first["psnr_interpolation"] - first["psnr_constant"], color=colour, ls=":", lw=1,
                   label=f"interpolation of the visible voxels ({name})")
        for e in extra:
            ax.scatter([e["step"]], [e[key]["gain_db"]], marker="*", s=120, color=colour,
                       label=f"{e['label']} ({name})")
    ax.axhline(3.0, color="k", ls="--", lw=0.8, label="issue-10 target (+3 dB)")
    ax.set_xlabel("pre-training step")
    ax.set_ylabel("masked PSNR gain over the constant (dB)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--extra", nargs="*", default=[], help="LABEL=CKPT, shown as stars")
    ap.add_argument("--label", default="this run", help="legend name of the positional checkpoints' run")
    ap.add_argument("--compare", nargs="*", default=[], help="LABEL=GLOB: another run's checkpoints, drawn dashed")
    ap.add_argument("--ct", type=Path, default=DEFAULT_CT)
    ap.add_argument("--ct-windows", type=int, default=4)
    ap.add_argument("--phantoms", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0, load_before = time.perf_counter(), list(os.getloadavg())
    extra_paths = dict(item.partition("=")[::2] for item in args.extra)
    if not all(extra_paths.values()):
        raise SystemExit(f"--extra expects LABEL=CKPT, got {args.extra!r}")
    import glob
    compare_paths = {label: sorted(glob.glob(pattern)) for label, pattern in
                     (item.partition("=")[::2] for item in args.compare)}
    if not all(compare_paths.values()):
        raise SystemExit(f"--compare expects LABEL=GLOB matching checkpoints, got {args.compare!r}")
    every = [str(p) for p in args.checkpoints] + [p for paths in compare_paths.values() for p in paths]
    held_out = check_held_out([args.ct], {**{p: p for p in every}, **extra_paths})
    ct, phantoms = ev.ct_windows(str(args.ct), args.ct_windows), ev.phantom_windows(args.phantoms)
    rows = sorted((evaluate(p, ct, phantoms) for p in args.checkpoints), key=lambda r: r["step"])
    extra = [{"label": label, **evaluate(path, ct, phantoms)} for label, path in extra_paths.items()]
    compare = {label: sorted((evaluate(p, ct, phantoms) for p in paths), key=lambda r: r["step"])
               for label, paths in compare_paths.items()}
    for r in rows + extra + [{"label": f"{label} {r['step']}", **r} for label, rs in compare.items() for r in rs]:
        print(f"{r.get('label', r['step'])}: CT {r['ct']['gain_db']:+.2f} dB, phantoms {r['phantoms']['gain_db']:+.2f} dB")
    write_json(args.out, {"benchmark": "pretrain_curve", "machine": machine_info(), "threads": args.threads,
                          "held_out_ct": str(args.ct), "held_out": held_out, "ct_windows": args.ct_windows, "phantoms": args.phantoms,
                          "label": args.label, "rows": rows, "extra": extra, "compare": compare,
                          "seconds": time.perf_counter() - t0,
                          "load_before": load_before, "load_after": list(os.getloadavg())})
    plot(args.out.with_suffix(".png"), rows, extra, compare, args.label)
    return 0


if __name__ == "__main__":
    sys.exit(main())
