#!/usr/bin/env python
"""Train the bundled demo weights (``medgmae_core/weights/demo_tiny.pt``) with ``medgmae pretrain``.

These are DEMO weights: the tiny configuration, a few thousand CPU steps on procedural
phantoms and the real CTs in ``../shared/data/ct``. They are not the paper's weights.

    .venv/bin/python scripts/train_demo_weights.py --steps 3000 --work out/demo_weights

Re-running with the same ``--work`` resumes the run from its last checkpoint, so
training can be spread over several sessions. The final checkpoint is slimmed (model
weights and config only, no optimiser state) and written to ``--dest``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_CT = REPO.parent / "shared" / "data" / "ct" / "totalsegmentator"
REAL_CTS = ["example_ct.nii.gz", "chest_cta_pulmonary_ct_cropped.nii.gz", "example_ct_dicom"]


def write_datalist(work: Path, n_phantoms: int) -> Path:
    from medgmae_core.data.phantom import write_phantom_nifti

    data = work / "data"
    images = []
    for seed in range(n_phantoms):
        image = data / f"phantom{seed:02d}_ct.nii.gz"
        if not image.exists():
            write_phantom_nifti(data, seed=seed, name=f"phantom{seed:02d}")
        images.append(str(image))
    for name in REAL_CTS:
        path = SHARED_CT / name
        if path.exists():
            images.append(str(path))
        else:
            print(f"warning: {path} not found; training without it", file=sys.stderr)
    datalist = work / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": p} for p in images]}, indent=1))
    return datalist


def slim_copy(checkpoint: Path, dest: Path) -> None:
    """Model weights + config only: what ``load_model`` needs, without the optimiser state."""
    from medgmae_core.train.checkpoint import load_model, save_checkpoint

    model, config = load_model(checkpoint)
    import torch
    step = torch.load(checkpoint, map_location="cpu", weights_only=True)["step"]
    save_checkpoint(dest, model=model, config=config, step=step,
                    extra={"note": "MedGMAE-Slicer DEMO weights (tiny config, CPU-trained on phantoms and "
                                   "../shared/data/ct); not the paper's weights",
                           "recipe": "scripts/train_demo_weights.py"})
    print(f"wrote {dest} ({dest.stat().st_size / 2**20:.1f} MB, step {step})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--phantoms", type=int, default=6)
    parser.add_argument("--work", type=Path, default=REPO / "out" / "demo_weights")
    parser.add_argument("--dest", type=Path, default=REPO / "medgmae_core" / "weights" / "demo_tiny.pt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    datalist = write_datalist(args.work, args.phantoms)
    run_dir = args.work / "run"
    cmd = [sys.executable, "-m", "medgmae_core.cli", "pretrain", "--data", str(datalist),
           "--model", "tiny", "--objective", "gaussian", "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.seed),
           "--cache", "memory", "--checkpoint-every", "100", "--log-every", "10",
           "--out-dir", str(run_dir), "--resume", "auto"]
    print("running:", " ".join(cmd), flush=True)
    code = subprocess.call(cmd)
    if code != 0:
        return code
    args.dest.parent.mkdir(parents=True, exist_ok=True)
    slim_copy(run_dir / "last.pt", args.dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
