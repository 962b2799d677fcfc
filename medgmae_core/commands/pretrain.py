"""``medgmae pretrain``: the command over ``train.pretrain`` (settings: defaults < ``--config`` YAML < flags)."""
from __future__ import annotations

import argparse
import os
from typing import Any

from ..train.pretrain import AMP_CHOICES, CACHE_CHOICES, SETTINGS, load_settings_yaml, run, shipped_configs


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in str(text).replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or N,N,N, got {text!r}") from None


EXAMPLES = """examples:
  medgmae pretrain --data phantom:8 --steps 200 --out-dir runs/phantom        # no data needed
  medgmae pretrain --config pretrain_tiny_cpu --data /path/to/cts --objective voxel
  medgmae pretrain --config run.yaml --resume auto                             # continue exactly
  torchrun --nproc_per_node=4 -m medgmae_core.cli pretrain --config pretrain_large_gpu --data list.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    parser.add_argument("--config", metavar="YAML", help="YAML file of settings (flags override it), or the name of "
                        f"a shipped example: {', '.join(shipped_configs())}")
    types: dict[str, Any] = {"spacing_mm": float, "crops_per_case": int, "pos": float, "neg": float,
                             "phantom_shape": _int_list, "img_size": _int_list, "patch_size": _int_list,
                             "num_gaussians": int, "mask_ratio": float, "steps": int, "batch_size": int, "lr": float,
                             "min_lr_ratio": float, "warmup_steps": int, "weight_decay": float, "clip_grad": float,
                             "seed": int, "num_workers": int, "checkpoint_every": int, "keep_last": int,
                             "log_every": int}
    choices = {"objective": ("gaussian", "gaussian_star", "voxel"), "loss": ("masked", "release"),
               "amp": AMP_CHOICES, "cache": CACHE_CHOICES}
    for name, (default, help_text) in SETTINGS.items():
        if name == "model_overrides":
            continue
        flag = "--" + name.replace("_", "-")
        help_text = f"{help_text} (default: {default})" if default not in (None, False, {}) else help_text
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=help_text)
        elif name == "data":
            parser.add_argument(flag, nargs="+", metavar="DATA", default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type=types.get(name, str), choices=choices.get(name),
                                default=argparse.SUPPRESS, help=help_text)


def explicit_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Settings given by the user: the YAML file, then the flags over it."""
    given = load_settings_yaml(args.config) if getattr(args, "config", None) else {}
    given.update({k: getattr(args, k) for k in SETTINGS if hasattr(args, k)})
    return given


def main(args: argparse.Namespace) -> int:
    from ..train.distributed import cleanup_distributed, init_distributed, resolve_device

    explicit = explicit_settings(args)
    device = resolve_device(explicit.get("device", SETTINGS["device"][0]), int(os.environ.get("LOCAL_RANK", "0")))
    info = init_distributed(device)
    try:
        return run(explicit, device, info)
    finally:
        cleanup_distributed()
