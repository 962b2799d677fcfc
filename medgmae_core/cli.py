"""The ``medgmae`` command line: ``medgmae demo | pretrain | finetune | segment | evaluate | reconstruct | render``.

Each subcommand lives in its own module, which defines
``add_arguments(parser)`` and ``main(args) -> int``; modules are imported only
when their command runs, so ``medgmae --help`` stays fast.

Errors are handled here, once, for every command (:func:`run_command`): a user error (``errors.UserError``,
``ValueError``, ``FileNotFoundError``, file-system errors such as a full disk or a read-only folder, running out
of memory) prints one line ``medgmae COMMAND: error: ...`` naming the file or parameter, emits the JSON ``error``
event when ``--progress-json`` is on, removes the command's temporary files (``errors.cleanup_command``) and
exits with code 2. Anything else is a bug: the ``error`` event is still emitted, then the traceback. Every
command also gets ``--progress-json`` and, when it reads CTs, ``--resample-dicom``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from . import errors, progress

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("medgmae_core.commands.demo", "mask a CT (or the built-in phantom), predict Gaussians, write NIfTI/PLY/.mrb/PNG"),
    "pretrain": ("medgmae_core.commands.pretrain", "self-supervised pre-training (MedGMAE, MedGMAE* or voxel MAE)"),
    "finetune": ("medgmae_core.commands.finetune", "fine-tune UNETR for segmentation from a pre-trained encoder"),
    "segment": ("medgmae_core.commands.segment", "segment a CT with a fine-tuned checkpoint"),
    "evaluate": ("medgmae_core.commands.evaluate", "Dice and HD95 of label maps against references"),
    "reconstruct": ("medgmae_core.commands.reconstruct", "3DGR-CT Gaussian reconstruction from projections"),
    "render": ("medgmae_core.commands.render", "render a Gaussian PLY to a NIfTI volume (and a PNG overview)"),
    "fit": ("medgmae_core.commands.fit", "fit Gaussians straight to a CT (or one window) with the renderer"),
    "view": ("medgmae_core.commands.view", "browser viewer: slices, 3D glyphs, predict, thresholds, export"),
}


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2 (kept for compatibility; see ``errors.UserError``)."""


# commands that read CT images: they get ``--resample-dicom`` (the one DICOM reader in ``data.readers`` uses it)
READS_CT = ("demo", "pretrain", "finetune", "segment", "reconstruct", "render")


def _has_option(parser: argparse.ArgumentParser, option: str) -> argparse.Action | None:
    return next((a for a in parser._actions if option in a.option_strings), None)


def add_common_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Options every command shares, added when its module does not define them itself."""
    action = _has_option(parser, "--progress-json")
    if action is None:
        action = parser.add_argument("--progress-json", action="store_true",
                                     help="JSON-lines events on stdout (start, progress, done, error)")
    parser.set_defaults(_json_dest=action.dest)
    if command in READS_CT and _has_option(parser, "--resample-dicom") is None:
        parser.add_argument("--resample-dicom", action="store_true",
                            help="accept a DICOM series with missing slices or uneven slice spacing by resampling "
                                 "its readable slices onto a uniform grid (default: refuse it, naming the problem)")


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
            add_common_arguments(p, name)
    return parser


def _output_folders(args: argparse.Namespace) -> list[Path]:
    """Folders the command writes into (``--out`` folder or the folder of an ``--out`` file, ``--out-dir``)."""
    folders = []
    for name in ("out", "out_dir"):
        value = getattr(args, name, None)
        if not value:
            continue
        path = Path(str(value)).expanduser()
        is_file = path.is_file() or (not path.is_dir() and "." in path.name.lstrip("."))
        folders.append(path.parent if is_file else path)
    return folders


def _json_requested(args: argparse.Namespace) -> bool:
    return bool(getattr(args, getattr(args, "_json_dest", "progress_json"), False)) or progress.json_lines_used()


def _emit_error(args: argparse.Namespace, message: str, mark: int) -> None:
    """The JSON ``error`` event, unless the command already emitted one."""
    if _json_requested(args) and progress.error_events_emitted() == mark:
        progress.ProgressReporter(args.command, 0, json_lines=True).error(message)


def run_command(args: argparse.Namespace) -> int:
    """Run one parsed command; the one place user errors are reported (module docstring of ``errors``)."""
    errors.begin_command(args.command)
    mark = progress.error_events_emitted()
    progress.reset_json_lines_used()
    resample_dicom = bool(getattr(args, "resample_dicom", False))
    if resample_dicom:  # the one DICOM reader's default for this command
        from .data import readers  # lazy: data.readers loads MONAI (heavy), imported only when needed

        readers.set_resample_dicom(True)
    try:
        for folder in _output_folders(args):
            errors.watch_output_dir(folder)
            errors.remove_stale_temp_files(folder)
        module = importlib.import_module(args._module)
        code = int(module.main(args) or 0)
    except KeyboardInterrupt:
        errors.cleanup_command()
        print(f"medgmae {args.command}: interrupted", file=sys.stderr)
        _emit_error(args, "interrupted", mark)
        return 130
    except Exception as exc:
        message = errors.user_message(exc)
        errors.cleanup_command()
        if message is None:  # a bug, not a user error: keep the traceback, but never fail silently
            _emit_error(args, errors.describe(exc), mark)
            raise
        print(f"medgmae {args.command}: error: {message}", file=sys.stderr)
        _emit_error(args, message, mark)
        return errors.EXIT_USER_ERROR
    finally:
        if resample_dicom:
            readers.set_resample_dicom(False)
    errors.finish_command()
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.command:
        parser.print_help()
        return 2
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
