"""Analytic Gaussian projector benchmark: fast (numba) vs torch patches (vs dense reference), in one run.

    python benchmarks/projector_bench.py --out projector.json [--quick] [--skip-scale]

Cases: 120 views, 128x128 detector, k in {1024, 4096}, parallel and cone beam,
Gaussians as in the renderer benchmark (a 96^3 volume at 1.5 mm, sigma
log-uniform in [0.02, 0.1] of the side, random rotations), float32.
Each record: projector, geometry, k, views, detector, forward_s,
forward_backward_s, peak_extra_mb, useful_pairs (splat pixels inside the
cutoff), plus ``ratios`` (torch / fast, reference / fast) measured in the same
run. The scale case puts 300k Gaussians through 120 views of 256x256.
``forward_backward_cpu_s`` is the process CPU time of one forward+backward (all
threads): on a shared, overloaded machine it divided by the thread count is a
better estimate of the unloaded wall time than the wall time itself.
``projector_cases(quick)`` is also called by ``benchmarks/render.py``.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakMemory, best_of, write_json  # noqa: E402

from medgmae_core.gaussians import GaussianSet  # noqa: E402
from medgmae_core.numba_support import numba_available  # noqa: E402
from medgmae_core.xray.gaussian_projector import gaussians_mm, project_gaussians, splat_params  # noqa: E402
from medgmae_core.xray.geometry import ConeBeam, ParallelBeam, evenly_spaced_angles  # noqa: E402

VIEWS = 120
DETECTOR = (128, 128)
VOLUME = (96, 96, 96)
SPACING_MM = 1.5
CUTOFF = 3.0
TARGETS = {"parallel_k4096_fast_forward_backward_s_max": 1.5, "scale_peak_extra_mb_max": 2048.0}
SCALE = {"k": 300_000, "views": 120, "detector": (256, 256), "volume": (256, 256, 256), "spacing_mm": 1.0,
         "sigma_range": (0.002, 0.01)}


def make_geometry(kind: str, views: int = VIEWS, detector=DETECTOR, volume=VOLUME, spacing_mm=SPACING_MM):
    """A ``detector``-sized geometry just covering ``volume``; square pixels."""
    extent = tuple((n - 1) * spacing_mm for n in volume)
    angles = evenly_spaced_angles(views, math.pi if kind == "parallel" else 2 * math.pi)
    rows, cols = detector
    if kind == "parallel":
        pixel = 1.01 * max(math.hypot(extent[0], extent[1]) / (cols - 1), extent[2] / (rows - 1))
        return ParallelBeam(angles, detector, (pixel, pixel), extent)
    radius = 0.5 * math.hypot(extent[0], extent[1])
    probe = ConeBeam(angles, (1, 1), (1.0, 1.0), extent, source_to_origin=3 * radius, source_to_detector=6 * radius)
    (u_lo, u_hi), (v_lo, v_hi) = probe.volume_footprint_mm()
    pixel = 1.01 * max(2 * max(-u_lo, u_hi) / (cols - 1), 2 * max(-v_lo, v_hi) / (rows - 1))
    return probe.copy_with(detector_shape=detector, detector_spacing=(pixel, pixel))


def useful_pairs(g: GaussianSet, geom) -> int:
    """Detector pixels inside each splat's cutoff ellipse, summed (ellipse area, border clipping ignored)."""
    with torch.no_grad():
        means, cov, det3 = gaussians_mm(g.to(dtype=torch.float64), geom)
        params = splat_params(means, cov, det3, g.intensities.double(), geom, slice(None))
        det = params[..., 2] * params[..., 4] - params[..., 3] ** 2
        return int((math.pi * CUTOFF**2 / det.sqrt()).sum())


def measure(projector: str, g: GaussianSet, geom, repeats: int) -> dict:
    leaves = g.map(lambda t: t.detach().clone().requires_grad_())
    weight = torch.rand((g.batch_size, geom.n_views, *geom.detector_shape), generator=torch.Generator().manual_seed(0))

    def forward():
        with torch.no_grad():
            project_gaussians(g, geom, cutoff=CUTOFF, backend=projector)

    def forward_backward():
        for t in leaves.tensors():
            t.grad = None
        (project_gaussians(leaves, geom, cutoff=CUTOFF, backend=projector) * weight).sum().backward()

    forward_s = best_of(forward, repeats=repeats, warmup=1)
    with PeakMemory() as mem:
        cpu0 = time.process_time()
        forward_backward()
        cpu_s = time.process_time() - cpu0
    forward_backward_s = best_of(forward_backward, repeats=repeats, warmup=0)
    return {"projector": projector, "geometry": geom.kind, "k": g.num_gaussians, "views": geom.n_views,
            "detector": list(geom.detector_shape), "forward_s": forward_s, "forward_backward_s": forward_backward_s,
            "peak_extra_mb": mem.peak_extra_mb, "forward_backward_cpu_s": cpu_s}


def projector_cases(quick: bool = False) -> list[dict]:
    """Records for fast vs torch, both geometries; unless quick, also fast vs the dense reference
    at k=1024 on 12 parallel views (the reference at 120 views takes minutes)."""
    fast = "numba" if numba_available() else "torch"
    plan = [(kind, k, VIEWS, [fast] + (["torch"] if fast != "torch" else []))
            for kind in ("parallel", "cone") for k in (1024, 4096)]
    if not quick:
        plan.append(("parallel", 1024, 12, [fast, "reference"]))
    records = []
    for kind, k, views, projectors in plan:
        geom = make_geometry(kind, views=views)
        g = GaussianSet.random(1, k, sigma_range=(0.02, 0.1), generator=torch.Generator().manual_seed(k))
        pairs = useful_pairs(g, geom)
        case = {}
        for name in projectors:
            repeats = 1 if (quick or name != fast) else 3
            rec = measure(name, g, geom, repeats)
            rec["useful_pairs"] = pairs
            rec["useful_pairs_per_s_forward"] = pairs / rec["forward_s"]
            case[name] = rec
            print(f"{kind:8s} k={k:5d} {name:9s} fwd {rec['forward_s']:.3f} s  fwd+bwd "
                  f"{rec['forward_backward_s']:.3f} s  peak {rec['peak_extra_mb']:.0f} MB", flush=True)
        for name, rec in case.items():
            if name != fast:
                rec["forward_ratio_vs_fast"] = rec["forward_s"] / case[fast]["forward_s"]
                rec["forward_backward_ratio_vs_fast"] = rec["forward_backward_s"] / case[fast]["forward_backward_s"]
        records.extend(case.values())
    return records


def scale_case() -> dict:
    """300k Gaussians, 120 parallel views of 256x256: forward, forward+backward, peak extra memory."""
    geom = make_geometry("parallel", SCALE["views"], SCALE["detector"], SCALE["volume"], SCALE["spacing_mm"])
    g = GaussianSet.random(1, SCALE["k"], sigma_range=SCALE["sigma_range"], generator=torch.Generator().manual_seed(7))
    leaves = g.map(lambda t: t.detach().clone().requires_grad_())
    with PeakMemory() as mem:
        t0, cpu0 = time.perf_counter(), time.process_time()
        out = project_gaussians(leaves, geom, cutoff=CUTOFF)
        forward_s = time.perf_counter() - t0
        out.sum().backward()
        forward_backward_s = time.perf_counter() - t0
        cpu_s = time.process_time() - cpu0
        del out
    return {"projector": "auto", "geometry": "parallel", "k": SCALE["k"], "views": SCALE["views"],
            "detector": list(SCALE["detector"]), "forward_s": forward_s, "forward_backward_s": forward_backward_s,
            "peak_extra_mb": mem.peak_extra_mb, "forward_backward_cpu_s": cpu_s,
            "target_peak_extra_mb_max": TARGETS["scale_peak_extra_mb_max"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON output path")
    parser.add_argument("--quick", action="store_true", help="one repeat, no dense reference")
    parser.add_argument("--skip-scale", action="store_true", help="skip the 300k-Gaussian 256^2 case")
    args = parser.parse_args(argv)
    cases = projector_cases(args.quick)
    scale = None if args.skip_scale else scale_case()
    if scale:
        print(f"scale 300k: fwd {scale['forward_s']:.2f} s, fwd+bwd {scale['forward_backward_s']:.2f} s, "
              f"peak {scale['peak_extra_mb']:.0f} MB")
    fast = [c for c in cases if c["geometry"] == "parallel" and c["k"] == 4096 and c["views"] == VIEWS
            and "forward_ratio_vs_fast" not in c]
    met = {"parallel_k4096_fast_forward_backward_s": fast[0]["forward_backward_s"] if fast else None,
           "scale_peak_extra_mb": scale["peak_extra_mb"] if scale else None}
    write_json(args.out, {"benchmark": "projector", "cases": cases, "scale_case": scale, "targets": TARGETS,
                          "measured": met})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
