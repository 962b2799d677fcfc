"""``medgmae segment CT --checkpoint C --out seg.nii.gz``: the command over ``seg.segment.segment``."""
from __future__ import annotations

import argparse
import json

import torch

from ..progress import ProgressReporter
from ..seg.segment import segment
from ..train.distributed import resolve_device
from .options import add_option


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="CT: NIfTI/NRRD/MHA file or a DICOM series folder")
    parser.add_argument("--checkpoint", required=True, help="fine-tuned checkpoint from `medgmae finetune`")
    parser.add_argument("--out", required=True, help="output label map (.nii.gz); names go to <out>.labels.json")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1) (default 0.5)")
    parser.add_argument("--sw-batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy machine)")
    parser.add_argument("--max-voxels", type=int, default=None,
                        help="refuse a working grid (the CT at the checkpoint's spacing) above this many voxels "
                             "(default 100 M, or less if the memory would not hold it)")
    add_option(parser, "--progress-json", "--json-lines", dest="json_lines", action="store_true",
               help="JSON-lines progress on stdout")


def main(args: argparse.Namespace) -> int:
    if not 0.0 <= args.overlap < 1.0:
        raise ValueError(f"--overlap must be in [0, 1), got {args.overlap}")
    if args.sw_batch_size < 1:
        raise ValueError(f"--sw-batch-size must be >= 1, got {args.sw_batch_size}")
    if args.max_voxels is not None and args.max_voxels < 1:
        raise ValueError(f"--max-voxels must be >= 1, got {args.max_voxels}")
    if args.threads:
        torch.set_num_threads(args.threads)
    reporters: list[ProgressReporter] = []

    def on_start(**fields) -> None:  # after every input check: a bad input gets one line, no progress bar
        reporters.append(ProgressReporter("segment", 1, json_lines=args.json_lines))
        reporters[0].start(**fields)

    # errors: cli.main reports them (one line, the JSON error event, temporary files removed, exit 2)
    try:
        result = segment(args.input, args.checkpoint, args.out, overlap=args.overlap,
                         sw_batch_size=args.sw_batch_size, device=resolve_device(args.device),
                         max_voxels=args.max_voxels, on_start=on_start)
    except BaseException:
        for r in reporters:
            r.close()
        raise
    reporter = reporters[0]
    reporter.progress(1)
    reporter.done(**result)
    if not args.json_lines:
        print(json.dumps(result, indent=1))
    return 0
