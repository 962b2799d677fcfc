"""``medgmae finetune``: the command over ``seg.finetune`` (UNETR from a pre-trained encoder)."""
from __future__ import annotations

import argparse
import json
import sys

from ..seg.finetune import run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = parser.add_argument_group("data")
    d.add_argument("--data", help="datalist JSON ({'training': [{'image', 'label'}], 'validation': [...]}) "
                   "or phantom[:N] (generated phantoms with labels)")
    d.add_argument("--case", nargs=2, action="append", metavar=("IMAGE", "LABEL"),
                   help="a training case (repeatable), instead of --data")
    d.add_argument("--label-map", help="JSON naming the label ids (e.g. labels_total_v2.json)")
    d.add_argument("--classes", help="task classes by name, e.g. liver,spleen,kidneys=kidney_left+kidney_right "
                   "(default: every label in the map)")
    d.add_argument("--label-fraction", type=float, default=1.0, help="share of training cases used (0.01, 0.1, 1)")
    d.add_argument("--val-fraction", type=float, default=0.2, help="cases held out for validation if the "
                   "datalist has no 'validation' list (default 0.2)")
    d.add_argument("--spacing", type=float, default=1.5, help="resample to this spacing in mm (<= 0: keep)")
    d.add_argument("--roi", type=int, nargs="+", default=[96], help="crop / sliding window size (default 96)")
    d.add_argument("--crops-per-case", type=int, default=2)
    d.add_argument("--pos", type=float, default=3.0, help="crops centred on labels : background = pos : neg")
    d.add_argument("--neg", type=float, default=1.0)
    d.add_argument("--phantom-shape", type=int, nargs=3, default=[96, 96, 64])
    d.add_argument("--phantom-spacing", type=float, default=3.0)
    m = parser.add_argument_group("model")
    m.add_argument("--encoder", help="pre-trained checkpoint (ours, any objective, or the release layout); "
                   "omit to train from scratch")
    m.add_argument("--config", default="tiny", help="encoder size when training from scratch (tiny/base/large)")
    m.add_argument("--patch-size", type=int, help="patch size (scratch only; must match a pre-trained encoder)")
    m.add_argument("--num-heads", type=int, help="attention heads (release checkpoints of unusual width)")
    m.add_argument("--feature-size", type=int, default=16, help="UNETR decoder width (default 16)")
    m.add_argument("--freeze-encoder", action="store_true", help="train the decoder only")
    o = parser.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=1000)
    o.add_argument("--batch-size", type=int, default=2)
    o.add_argument("--lr", type=float, default=1e-4)
    o.add_argument("--weight-decay", type=float, default=1e-5)
    o.add_argument("--layer-decay", type=float, default=0.75, help="layer-wise lr decay (1 = off)")
    o.add_argument("--warmup", type=int, default=50)
    o.add_argument("--clip-grad", type=float, default=1.0)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    o.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy machine)")
    r = parser.add_argument_group("output")
    r.add_argument("--out", required=True, help="run folder: step_*.pt, last.pt, best.pt, curves.png, history.json")
    r.add_argument("--val-every", type=int, default=100)
    r.add_argument("--checkpoint-every", type=int, default=200)
    r.add_argument("--keep-last", type=int, default=2)
    r.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    r.add_argument("--progress-json", "--json-lines", dest="json_lines", action="store_true",
                   help="JSON-lines progress on stdout")
    r.add_argument("--quiet", action="store_true", help="no encoder load report")


def main(args: argparse.Namespace) -> int:
    for name in ("steps", "batch_size", "val_every", "checkpoint_every", "crops_per_case"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    summary = run(args)
    if not args.json_lines:
        print(json.dumps(summary, indent=1), file=sys.stderr)
    return 0
