"""``medgmae evaluate --pred P --ref R [--labels JSON]``: the command over ``seg.evaluate.evaluate_files``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import atomic_path, make_output_dir
from ..progress import ProgressReporter
from ..seg.evaluate import evaluate_files, format_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", required=True, help="predicted label map (NIfTI/NRRD)")
    parser.add_argument("--ref", required=True, help="reference label map (NIfTI/NRRD)")
    parser.add_argument("--labels", help="label-map JSON naming the reference's ids (e.g. labels_total_v2.json)")
    parser.add_argument("--pred-labels", help="label-map JSON naming the prediction's ids "
                        "(default: the prediction's .labels.json sidecar, else --labels)")
    parser.add_argument("--classes", help="comma-separated class names (or ids) to score; default all")
    parser.add_argument("--no-hd95", action="store_true", help="skip the Hausdorff distance (faster)")
    parser.add_argument("--out", help="write the metrics JSON here")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")


def main(args: argparse.Namespace) -> int:
    result = evaluate_files(args.pred, args.ref, labels=args.labels, pred_labels=args.pred_labels,
                            classes=args.classes, with_hd95=not args.no_hd95)
    if args.out:
        make_output_dir(Path(args.out).parent)
        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(result, indent=1) + "\n")
    if getattr(args, "progress_json", False):
        ProgressReporter("evaluate", 1, json_lines=True).done(**result)
    else:
        print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0
