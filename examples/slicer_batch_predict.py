"""Batch MedGMAE prediction with the Slicer module's logic: load a CT, mask it, predict, save a Slicer scene.

In 3D Slicer (no window)::

    Slicer --no-splash --no-main-window --python-script examples/slicer_batch_predict.py -- \\
        --input CT.nii.gz --checkpoint CKPT.pt --out scene.mrb

or with plain Python and slicer-core (``pip install 'medgmae-core[slicer]'``)::

    python examples/slicer_batch_predict.py --input CT.nii.gz --checkpoint CKPT.pt --out scene.mrb

The scene holds the CT, the masked CT and its mask label map, the rendered prediction, the ellipsoid glyph model
and the table of Gaussian parameters. Exit code 0 on success, 2 for bad inputs, 1 for other failures.

``--png`` renders the 3D view. Inside Slicer that needs Slicer's main window, so a display: run without
``--no-main-window`` (with ``xvfb-run`` on a server). Under plain Python the script asks VTK for an offscreen EGL
window when there is no display; that has to happen before VTK is imported, so it is done first thing here.
"""
from __future__ import annotations

import os
import sys

if "slicer" not in sys.modules and sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")  # before anything imports VTK

import argparse  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

MODULE_DIR = Path(__file__).resolve().parents[1] / "MedGMAESlicer"
if MODULE_DIR.is_dir() and str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))  # source checkout; an installed extension is on the path already


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="slicer_batch_predict.py", description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="CT volume (NIfTI, NRRD, MHA) or DICOM folder, in HU")
    parser.add_argument("--checkpoint", default=None, help="MedGMAE checkpoint (default: the bundled demo weights)")
    parser.add_argument("--out", required=True, help="scene bundle to write (.mrb)")
    parser.add_argument("--mode", choices=("point", "whole"), default="whole",
                        help="one model window around --point (or the volume centre), or the whole volume")
    parser.add_argument("--point", default=None, help="window centre R,A,S in mm (with --mode point)")
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches hidden (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random patch mask")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--glyph-sigma", type=int, choices=(1, 2, 3), default=2, help="glyph radius in sigmas")
    parser.add_argument("--threshold", type=float, default=0.1,
                        help="show Gaussians with at least this fraction of the strongest one's intensity")
    parser.add_argument("--ply", default=None, help="also write the Gaussians as PLY")
    parser.add_argument("--nifti", default=None, help="also write the rendered prediction as NIfTI")
    parser.add_argument("--png", default=None, help="also render the 3D view to this PNG (in Slicer: needs the main "
                        "window and a display; with plain Python: offscreen EGL)")
    return parser.parse_args(argv[1:] if argv and argv[0] == "--" else argv)


def load_ct(session, path: Path):
    """A file through Slicer's reader; a DICOM folder through medgmae_core's reader."""
    from MedGMAESlicerLib.logic import add_volume
    if path.is_dir():
        from medgmae_core.export.nifti import read_volume_array
        array, affine = read_volume_array(path, what="CT")
        return add_volume(session.scene, array, affine, path.name)
    return session.load_volume(path)


def run(args: argparse.Namespace) -> str:
    from MedGMAESlicerLib.headless import create_session
    from MedGMAESlicerLib.logic import GlyphSettings, MedGMAELogic

    session = create_session()
    if session.scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode") == 0:
        session.add_slice_views()
    ct = load_ct(session, Path(args.input))
    logic = MedGMAELogic(session.scene)
    if args.mask_ratio > 0:
        logic.preview_mask(ct, mask_ratio=args.mask_ratio, seed=args.seed)
    point = [float(v) for v in args.point.split(",")] if args.point else None
    if point is not None and len(point) != 3:
        raise ValueError(f"--point must be R,A,S (three numbers), got {args.point!r}")
    logic.predict(ct, checkpoint=args.checkpoint, mode=args.mode, point_ras=point, mask_ratio=args.mask_ratio,
                  seed=args.seed, device=args.device, interactive=False,
                  glyph=GlyphSettings(sigma=args.glyph_sigma, threshold=args.threshold))
    if args.ply:
        logic.export_ply(args.ply)
    if args.nifti:
        logic.export_nifti(args.nifti)
    if args.png:
        session.render_3d(args.png)
    session.save_mrb(args.out)
    return f"{logic.status_text()} Scene: {args.out}"


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    try:
        print(run(args), flush=True)
        return 0
    except (FileNotFoundError, ValueError) as exc:
        print(f"slicer_batch_predict: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except Exception:  # noqa: BLE001 - report anything else with its traceback
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
