"""``medgmae finetune``: the command over ``seg.finetune.run`` (UNETR from a pre-trained encoder).

Settings: ``seg.settings.FinetuneSettings``'s defaults < ``--config`` YAML (flat; keys are the python names of the
flags, e.g. ``batch_size: 4``) < flags. Flag names follow ``commands.options``; the old spellings ``--warmup``,
``--roi``, ``--spacing``, ``--json-lines`` and ``--config SIZE`` still work (hidden) for one release.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from ..model.configs import CONFIG_NAMES as MODEL_SIZES
from ..seg.finetune import run
from ..seg.settings import FinetuneSettings
from ..train.settings import read_settings_yaml
from .options import add_option, add_resume, int_triple

log = logging.getLogger(__name__)
S = argparse.SUPPRESS  # every default comes from FinetuneSettings, so --config can sit between them and the flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = parser.add_argument_group("data")
    d.add_argument("--data", default=S, help="datalist JSON ({'training': [{'image', 'label'}], 'validation': [...]}) "
                   "or phantom[:N] (generated phantoms with labels)")
    d.add_argument("--case", dest="cases", nargs=2, action="append", metavar=("IMAGE", "LABEL"), default=S,
                   help="a training case (repeatable), instead of --data")
    d.add_argument("--label-map", default=S, help="JSON naming the label ids (e.g. labels_total_v2.json)")
    d.add_argument("--classes", default=S, help="task classes by name, e.g. liver,spleen,kidneys=kidney_left+kidney_right "
                   "(default: every label in the map)")
    d.add_argument("--label-fraction", type=float, default=S, help="share of training cases used (0.01, 0.1, 1)")
    d.add_argument("--val-fraction", type=float, default=S, help="cases held out for validation if the "
                   "datalist has no 'validation' list (default 0.2)")
    add_option(d, "--spacing-mm", "--spacing", type=float, default=S,
               help="resample to this spacing in mm (<= 0: keep; default 1.5)")
    add_option(d, "--img-size", "--roi", type=int_triple, nargs="+", default=S,
               help="crop / sliding window size: N or D,H,W (default 96)")
    d.add_argument("--crops-per-case", type=int, default=S, help="(default 2)")
    d.add_argument("--pos", type=float, default=S, help="crops centred on labels : background = pos : neg (3 : 1)")
    d.add_argument("--neg", type=float, default=S)
    d.add_argument("--phantom-shape", type=int, nargs=3, default=S, help="(default 96 96 64)")
    d.add_argument("--phantom-spacing", type=float, default=S, help="(default 3)")
    m = parser.add_argument_group("model")
    m.add_argument("--encoder", default=S, help="pre-trained checkpoint (ours, any objective, or the release layout); "
                   "omit to train from scratch")
    m.add_argument("--model", default=S, help="encoder size when training from scratch: tiny, base or large "
                   "(default tiny)")
    m.add_argument("--config", metavar="YAML", help="YAML file of settings (flags override it)")
    m.add_argument("--patch-size", type=int, default=S,
                   help="patch size (scratch only; must match a pre-trained encoder)")
    m.add_argument("--num-heads", type=int, default=S, help="attention heads (release checkpoints of unusual width)")
    m.add_argument("--feature-size", type=int, default=S, help="UNETR decoder width (default 16)")
    m.add_argument("--freeze-encoder", action="store_true", default=S, help="train the decoder only")
    o = parser.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=S, help="(default 1000)")
    o.add_argument("--batch-size", type=int, default=S, help="(default 2)")
    o.add_argument("--lr", type=float, default=S, help="(default 1e-4)")
    o.add_argument("--weight-decay", type=float, default=S, help="(default 1e-5)")
    o.add_argument("--layer-decay", type=float, default=S, help="layer-wise lr decay (1 = off; default 0.75)")
    add_option(o, "--warmup-steps", "--warmup", type=int, default=S, help="linear warmup steps (default 50)")
    o.add_argument("--clip-grad", type=float, default=S, help="(default 1)")
    o.add_argument("--seed", type=int, default=S, help="(default 0)")
    o.add_argument("--device", default=S, help="auto (CUDA when available), cpu, cuda or cuda:N")
    o.add_argument("--threads", type=int, default=S, help="torch CPU threads (1 is fastest on a busy machine)")
    r = parser.add_argument_group("output")
    r.add_argument("--out", default=S, help="run folder: step_*.pt, last.pt, best.pt, curves.png, history.json")
    r.add_argument("--val-every", type=int, default=S, help="(default 100)")
    r.add_argument("--checkpoint-every", type=int, default=S, help="(default 200)")
    r.add_argument("--keep-last", type=int, default=S, help="(default 2)")
    add_resume(r, default=S)
    add_option(r, "--progress-json", "--json-lines", action="store_true", default=S,
               help="JSON-lines progress on stdout")
    r.add_argument("--quiet", action="store_true", default=S, help="no encoder load report")


def _flat_size(value: Any) -> Any:
    """``--img-size 96`` / ``96,96,64`` / ``24 24 16`` (argparse gives lists of lists) -> N or [D, H, W]."""
    if isinstance(value, (list, tuple)):
        flat = [int(v) for item in value for v in (item if isinstance(item, (list, tuple)) else [item])]
        return flat[0] if len(flat) == 1 else flat
    return value


def settings_from_args(args: argparse.Namespace) -> FinetuneSettings:
    """Defaults < ``--config`` YAML < flags, as typed settings (the library never sees the Namespace)."""
    names = {f.name for f in dataclasses.fields(FinetuneSettings)}
    given = {k: v for k, v in vars(args).items() if k in names}
    merged: dict[str, Any] = {}
    config = getattr(args, "config", None)
    if config and not Path(config).expanduser().is_file() and config in MODEL_SIZES:
        log.warning("finetune --config %s: the model size is --model now (--config is a YAML file)", config)
        given.setdefault("model", config)  # old spelling: --config SIZE
    elif config:
        if not Path(config).expanduser().is_file():
            raise FileNotFoundError(f"--config: YAML file not found: {config}")
        merged = read_settings_yaml(Path(config).expanduser(), names)
    merged.update(given)
    if "img_size" in merged:
        merged["img_size"] = _flat_size(merged["img_size"])
    if "cases" in merged:
        merged["cases"] = [tuple(str(p) for p in pair) for pair in merged["cases"]]
    return FinetuneSettings(**merged)


def main(args: argparse.Namespace) -> int:
    settings = settings_from_args(args).check()
    summary = run(settings)
    if not settings.progress_json:
        print(json.dumps(summary, indent=1), file=sys.stderr)
    return 0
