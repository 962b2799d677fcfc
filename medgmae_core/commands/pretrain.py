"""``medgmae pretrain``: the command over ``train.pretrain`` (settings: defaults < ``--config`` YAML < flags)."""
from __future__ import annotations

import argparse
import os
from typing import Any

from ..train.distributed import cleanup_distributed, init_distributed, resolve_device
from ..train.pretrain import run
from ..train.settings import AMP_CHOICES, CACHE_CHOICES, SETTINGS, load_settings_yaml, shipped_configs
from .options import RESUME_HELP, add_option, int_triple


EXAMPLES = """examples:
  medgmae pretrain --data phantom:8 --steps 200 --out runs/phantom            # no data needed
  medgmae pretrain --config pretrain_tiny_cpu --data /path/to/cts --objective voxel
  medgmae pretrain --config run.yaml --resume auto                             # continue exactly
  torchrun --nproc_per_node=4 -m medgmae_core.cli pretrain --config pretrain_large_gpu --data list.json
"""


# settings whose flag is not --python-name (the one vocabulary of ``commands.options``) and old spellings kept as
# hidden aliases for one release; the python names (what checkpoints store in train_config) never change
FLAGS = {"out_dir": "--out"}
OLD_SPELLINGS = {"out_dir": ("--out-dir",)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    parser.add_argument("--config", metavar="YAML", help="YAML file of settings (flags override it), or the name of "
                        f"a shipped example: {', '.join(shipped_configs())}")
    types: dict[str, Any] = {"spacing_mm": float, "crops_per_case": int, "pos": float, "neg": float,
                             "phantom_shape": int_triple, "img_size": int_triple, "patch_size": int_triple,
                             "num_gaussians": int, "mask_ratio": float, "steps": int, "batch_size": int, "lr": float,
                             "min_lr_ratio": float, "warmup_steps": int, "weight_decay": float, "clip_grad": float,
                             "seed": int, "num_workers": int, "checkpoint_every": int, "keep_last": int,
                             "log_every": int}
    choices = {"objective": ("gaussian", "gaussian_star", "voxel"), "loss": ("masked", "release"),
               "amp": AMP_CHOICES, "cache": CACHE_CHOICES}
    for name, (default, help_text) in SETTINGS.items():
        if name == "model_overrides":
            continue
        flag = FLAGS.get(name, "--" + name.replace("_", "-"))
        aliases = OLD_SPELLINGS.get(name, ())
        help_text = f"{help_text} (default: {default})" if default not in (None, False, {}) else help_text
        if isinstance(default, bool):
            add_option(parser, flag, *aliases, dest=name, action="store_true", default=argparse.SUPPRESS,
                       help=help_text)
        elif name == "data":
            add_option(parser, flag, *aliases, dest=name, nargs="+", metavar="DATA", default=argparse.SUPPRESS,
                       help=help_text)
        elif name == "resume":  # auto | PATH; a bare --resume is auto
            add_option(parser, flag, *aliases, dest=name, nargs="?", const="auto", metavar="auto|PATH",
                       default=argparse.SUPPRESS, help=RESUME_HELP)
        else:
            add_option(parser, flag, *aliases, dest=name, type=types.get(name, str), choices=choices.get(name),
                       metavar="DIR" if name == "out_dir" else None, default=argparse.SUPPRESS, help=help_text)


def explicit_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Settings given by the user: the YAML file, then the flags over it."""
    given = load_settings_yaml(args.config) if getattr(args, "config", None) else {}
    given.update({k: getattr(args, k) for k in SETTINGS if hasattr(args, k)})
    return given


def main(args: argparse.Namespace) -> int:
    explicit = explicit_settings(args)
    device = resolve_device(explicit.get("device", SETTINGS["device"][0]), int(os.environ.get("LOCAL_RANK", "0")))
    info = init_distributed(device)
    try:
        return run(explicit, device, info)
    finally:
        cleanup_distributed()
