"""The ``medgmae`` command line: ``medgmae demo | pretrain | finetune | segment | evaluate | reconstruct | render``.

Each subcommand lives in its own module, which defines
``add_arguments(parser)`` and ``main(args) -> int``; modules are imported only
when their command runs, so ``medgmae --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("medgmae_core.demo", "mask a CT (or the built-in phantom), predict Gaussians, write NIfTI/PLY/.mrb/PNG"),
    "pretrain": ("medgmae_core.train.pretrain", "self-supervised pre-training (MedGMAE, MedGMAE* or voxel MAE)"),
    "finetune": ("medgmae_core.seg.finetune", "fine-tune UNETR for segmentation from a pre-trained encoder"),
    "segment": ("medgmae_core.seg.segment", "segment a CT with a fine-tuned checkpoint"),
    "evaluate": ("medgmae_core.seg.evaluate", "Dice and HD95 of label maps against references"),
    "reconstruct": ("medgmae_core.recon.cli", "3DGR-CT Gaussian reconstruction from projections"),
    "render": ("medgmae_core.render.cli", "render a Gaussian PLY to a NIfTI volume (and a PNG overview)"),
}


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """Full arguments are added only for the command named in ``argv``."""
    parser = argparse.ArgumentParser(prog="medgmae", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="WARNING", help="python logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        if name in argv:
            importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.command:
        parser.print_help()
        return 2
    module = importlib.import_module(args._module)
    try:
        return int(module.main(args) or 0)
    except (CLIError, FileNotFoundError, ValueError) as exc:
        print(f"medgmae {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
