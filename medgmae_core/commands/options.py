"""The one flag vocabulary of every ``medgmae`` command (and of the Slicer panels' command builders).

=================  ==========================================================================================
flag               meaning
=================  ==========================================================================================
``--out``          where the command writes: a folder (demo, fit, pretrain, finetune, reconstruct) or the one
                   output file (render, segment, evaluate)
``--resume``       ``auto`` (continue ``OUT/last.pt`` when it exists) or ``PATH`` (that checkpoint); a bare
                   ``--resume`` means ``auto``
``--warmup-steps`` linear learning-rate warmup, in optimiser steps
``--img-size``     crop / model input / sliding-window size: ``N`` or ``D,H,W``
``--spacing-mm``   isotropic voxel spacing the command resamples to, in mm
``--config``       a YAML file of settings (keys are the flags' python names; flags override it)
``--model``        model size: ``tiny``, ``base`` or ``large``
=================  ==========================================================================================

The spellings used before this vocabulary (``--out-dir``, ``--warmup``, ``--roi``, ``--spacing``, ``--json-lines``,
and ``finetune --config SIZE``) still work for one release as hidden aliases (not shown by ``--help``); they fill
the same python names, so settings stored in checkpoints (e.g. ``train_config["out_dir"]``) are unchanged.
"""
from __future__ import annotations

import argparse
from typing import Any

RESUME_HELP = "auto (continue OUT/last.pt if it exists; also a bare --resume) or a checkpoint PATH"


def add_option(parser, flag: str, *aliases: str, **kwargs: Any) -> argparse.Action:
    """``parser.add_argument(flag, **kwargs)`` plus each old spelling in ``aliases`` as a hidden alias (same
    python name; not in ``--help``; never sets a default of its own)."""
    action = parser.add_argument(flag, **kwargs)
    hidden = {k: v for k, v in kwargs.items() if k not in ("help", "default", "required", "metavar", "dest")}
    for alias in aliases:
        parser.add_argument(alias, dest=action.dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **hidden)
    return action


def add_resume(parser, **kwargs: Any) -> argparse.Action:
    """``--resume [auto|PATH]`` (a bare ``--resume`` is ``auto``)."""
    return parser.add_argument("--resume", nargs="?", const="auto", metavar="auto|PATH",
                               help=kwargs.pop("help", RESUME_HELP), **kwargs)


def int_triple(text: str) -> list[int]:
    """``N``, ``N,N,N`` or ``NxNxN`` -> a list of ints (argparse type of ``--img-size``)."""
    try:
        return [int(v) for v in str(text).replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or N,N,N, got {text!r}") from None


__all__ = ["add_option", "add_resume", "int_triple", "RESUME_HELP"]
