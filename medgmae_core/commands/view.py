"""``medgmae view [INPUT] [--port P] [--host 127.0.0.1]``: a local web viewer for a CT and its Gaussians.

INPUT: a CT (NIfTI, NRRD/MHA, DICOM folder), a ``medgmae demo`` / ``fit`` / ``reconstruct`` output folder, or a
Gaussian PLY; without INPUT the built-in phantom. The page (``medgmae_core.viewer``) shows axial / coronal /
sagittal slices with the Gaussians' 2-sigma outlines, a 3D view of the ellipsoid glyphs coloured by intensity over a
surface of the volume, a mask-ratio slider and Predict (the bundled or a chosen checkpoint), intensity and size
thresholds, picking and export (PLY, NIfTI, .mrb). It serves on 127.0.0.1 unless ``--host`` names another
interface, prints ``medgmae view: http://HOST:PORT/`` once it listens, and runs until Ctrl-C / SIGTERM. An input
that cannot be opened is reported in the page (and on stderr); the server still starts. Needs the ``[viewer]``
extra (trame, trame-vtk, trame-vuetify).
"""
from __future__ import annotations

import argparse
import sys

from .options import add_option


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", nargs="?", default=None,
                        help="CT file, DICOM folder, medgmae output folder or Gaussian PLY (default: the phantom)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 = any free port)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (default 127.0.0.1, this machine only; e.g. 0.0.0.0 serves "
                             "every interface: only do that on a trusted network)")
    parser.add_argument("--weights", default=None, help="checkpoint for Predict (default: the bundled weights)")
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="initial mask ratio (default 0.75)")
    add_option(parser, "--spacing-mm", "--spacing", type=float, default=1.5,
               help="display / model grid spacing in mm (default 1.5)")
    parser.add_argument("--phantom-shape", default="128,128,96", help="shape X,Y,Z of the built-in phantom")
    add_option(parser, "--out", "--export-dir", dest="export_dir", default=None, metavar="DIR",
               help="folder the page's Export buttons write into (default ./medgmae_view_out)")
    parser.add_argument("--predict", action="store_true", help="predict once at start-up")


def main(args: argparse.Namespace) -> int:
    try:
        shape = tuple(int(v) for v in str(args.phantom_shape).split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"--phantom-shape must be three integers X,Y,Z, each >= 8, got {args.phantom_shape!r}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if not 0.0 <= args.mask_ratio < 1.0:
        raise ValueError(f"--mask-ratio must be in [0, 1), got {args.mask_ratio}")
    # lazy: the viewer loads MONAI, SimpleITK and numba (seconds) and then trame / VTK (the optional [viewer] extra);
    # `medgmae view --help` and option errors stay fast
    from ..viewer.app import ViewerApp
    from ..viewer.session import ViewerSession

    session = ViewerSession(spacing_mm=args.spacing_mm, phantom_shape=shape)
    app = ViewerApp(session, export_dir=args.export_dir, weights=args.weights, mask_ratio=args.mask_ratio)
    app.state.source = args.input or ""
    if not app.load(args.input):
        print(f"medgmae view: {app.state.error} (the page shows it; open another input there)", file=sys.stderr)
    elif args.predict:
        app.predict_now()

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"medgmae view: warning: serving on {args.host}, not only this machine; the page has no login",
              file=sys.stderr)

    def ready(url: str) -> None:
        print(f"medgmae view: {url}", flush=True)

    app.serve(host=args.host, port=args.port, on_ready=ready)
    return 0
