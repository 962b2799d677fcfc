#!/usr/bin/env python
"""Train the bundled weights with ``medgmae pretrain`` and slim them into ``medgmae_core/weights/``.

The recipe of ``medgmae_core/weights/medgmae_tiny.pt`` (issue 10) has two stages, each a ``medgmae pretrain`` run:

1. ``WORK/base``: ``pretrain_tiny_cpu.yaml``, i.e. the ``tiny`` configuration (anchored Gaussian queries with
   local context and the interpolation intensity prior, k = 512, decoder depth 4), 4,000 steps at batch 2, AdamW
   lr 3e-4, 100 warmup steps, cosine to 0.1 x lr, seed 0, one torch thread, on 24 generated phantoms (seeds
   0..23), ``example_ct.nii.gz`` and the ``example_ct_dicom`` series of ``../shared/data/ct/totalsegmentator``.
2. ``WORK/real``: ``--init-from WORK/base/last.pt`` on the two real CTs only, 11,000 steps at lr 1e-4 (100
   warmup steps, cosine to 0.1 x lr). Measured on the held-out CT, longer training on the phantom-heavy mix
   overfits the phantoms (the CT score falls while the phantom score rises); the real-only stage does not.

The chest CTA there is NOT trained on: it is the held-out real CT of ``benchmarks/pretrain_quality.py`` and
``benchmarks/recon_init.py``. The checkpoint's ``extra["training_data"]`` lists both stages' inputs.

    .venv/bin/python scripts/train_weights.py --work runs/medgmae_tiny                           # resumable
    .venv/bin/python scripts/train_weights.py --objective voxel --work runs/voxel_tiny --dest runs/voxel_tiny.pt

Re-running with the same ``--work`` resumes exactly (a step's crops and masks depend only on the seed and the
step); ``--real-steps 0`` stops after stage 1. ``--slim-only`` skips training and slims the last stage's
``last.pt``. The slim copy keeps the model weights, config, step, the training list and the recipe; no
optimiser state. With ``--average-last N`` (bundled: 3) the slim copy holds the uniform average of the newest N
``step_*.pt`` checkpoints of the last stage (every 500 steps: the annealed tail), which measured steadier than
single ones (the held-out gain moved by +-0.6 dB between checkpoints of an earlier recipe). ``--half`` stores
the weights in float16 (half the file; MedGMAE*'s extra levels need it to stay under 20 MB); they load into the
float32 model unchanged otherwise.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_CT = Path("..") / "shared" / "data" / "ct" / "totalsegmentator"
REAL_CT = [str(SHARED_CT / "example_ct.nii.gz"), str(SHARED_CT / "example_ct_dicom")]
TRAINING_DATA = ["phantom:24", *REAL_CT]
HELD_OUT = [str(SHARED_CT / "chest_cta_pulmonary_ct_cropped.nii.gz")]


def average_weights(model, checkpoints: list[Path]) -> list[int]:
    """Load the uniform average of the checkpoints' float weights into ``model``; returns their steps."""
    import torch

    states = [torch.load(p, map_location="cpu", weights_only=False) for p in checkpoints]
    first = states[0]["model"]
    averaged = {k: (sum(s["model"][k].float() for s in states) / len(states)).to(v.dtype)
                if v.is_floating_point() else states[-1]["model"][k] for k, v in first.items()}
    model.load_state_dict(averaged)
    return [int(s["step"]) for s in states]


def slim_copy(checkpoint: Path, dest: Path, note: str, average: list[Path] | None = None, half: bool = False) -> None:
    """Model weights + config + provenance: what ``load_model`` needs, without the optimiser state."""
    import torch

    from medgmae_core.train.checkpoint import load_model, save_checkpoint

    model, config = load_model(checkpoint)
    averaged_steps = average_weights(model, average) if average else None
    full = torch.load(checkpoint, map_location="cpu", weights_only=False)
    extra = full.get("extra") or {}
    history = extra.get("history")
    if half:
        model = model.half()
    save_checkpoint(dest, model=model, config=config, step=full["step"], train_config=full.get("train_config"),
                    extra={"training_data": extra.get("training_data"), "held_out": HELD_OUT,
                           "recipe": "scripts/train_weights.py", "note": note, "averaged_steps": averaged_steps,
                           "final_loss": float(history[-100:, 1].mean()) if history is not None and len(history) else None})
    print(f"wrote {dest} ({dest.stat().st_size / 2**20:.1f} MB, step {full['step']})")


def run_stage(work: Path, steps: int, objective: str, data: list[str], extra: list[str], keep_last: int) -> int:
    """One resumable ``medgmae pretrain`` run in ``work``; the optimisation settings come from the YAML."""
    cmd = [sys.executable, "-m", "medgmae_core.cli", "pretrain", "--config", "pretrain_tiny_cpu",
           "--data", *data, "--objective", objective, "--steps", str(steps), *extra,
           "--checkpoint-every", "500", "--keep-last", str(max(4, keep_last)), "--log-every", "10",
           "--num-workers", "0", "--out", str(work), "--resume", "auto"]
    print("running:", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000, help="stage 1 steps (phantoms + real CT)")
    parser.add_argument("--real-steps", type=int, default=11000, help="stage 2 steps (real CT only; 0 = no stage 2)")
    parser.add_argument("--real-lr", type=float, default=1e-4, help="stage 2 peak learning rate")
    parser.add_argument("--objective", default="gaussian", choices=("gaussian", "gaussian_star", "voxel"))
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "medgmae_tiny")
    parser.add_argument("--dest", type=Path, default=REPO / "medgmae_core" / "weights" / "medgmae_tiny.pt")
    parser.add_argument("--note", default="MedGMAE-Slicer CPU weights (tiny config); not the paper's weights")
    parser.add_argument("--slim-only", action="store_true")
    parser.add_argument("--half", action="store_true", help="store the weights as float16")
    parser.add_argument("--average-last", type=int, default=3,
                        help="slim the average of the newest N step_*.pt checkpoints (1: last.pt alone)")
    args = parser.parse_args()

    base, real = args.work / "base", args.work / "real"
    last_stage = real if args.real_steps > 0 else base
    if not args.slim_only:
        code = run_stage(base, args.steps, args.objective, TRAINING_DATA, [], args.average_last)
        if code == 0 and args.real_steps > 0:
            code = run_stage(real, args.real_steps, args.objective, REAL_CT,
                             ["--init-from", str(base / "last.pt"), "--lr", str(args.real_lr)],
                             args.average_last)
        if code != 0:
            return code
    args.dest.parent.mkdir(parents=True, exist_ok=True)
    average = None
    if args.average_last > 1:
        average = sorted(last_stage.glob("step_*.pt"))[-args.average_last:]
        if len(average) < args.average_last:
            raise SystemExit(f"--average-last {args.average_last}: only {len(average)} step_*.pt in {last_stage}")
    slim_copy(last_stage / "last.pt", args.dest, args.note, average, half=args.half)
    return 0


if __name__ == "__main__":
    sys.exit(main())
