"""Renderer benchmark: fast CPU path vs tile torch path vs dense reference, in one run.

    python benchmarks/render.py --out render.json [--quick]

Writes one record per (renderer, k, batch) case to ``cases`` (fields renderer, k, batch,
shape, forward_s, forward_backward_s, peak_extra_mb, useful_evals_per_s), the ratios
between renderers measured in the same run, a ``targets`` block, the projector cases
(from ``benchmarks/projector_bench.py`` when present) and a ``scale_case`` (300k
Gaussians into 256^3, forward+backward).

A useful evaluation is a (Gaussian, voxel) pair inside the 3-sigma ellipsoid; it is
counted exactly by the Numba kernel's own line solve (or, without numba, estimated as
the ellipsoid volume in voxels, ignoring clipping at the volume border).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import math
import os
import sys
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning torch threads
# steal the cores from Numba's workers and from each other (measured 5x wall-time inflation).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakMemory, best_of, write_json  # noqa: E402

from medgmae_core.gaussians import GaussianSet  # noqa: E402
from medgmae_core.numba_support import get_num_threads, numba_available  # noqa: E402
from medgmae_core.render import render_reference, render_volume  # noqa: E402
from medgmae_core.render.conventions import get_convention  # noqa: E402
from medgmae_core.render.geometry import clip_boxes, render_inputs  # noqa: E402

SHAPE = (96, 96, 96)
CUTOFF = 3.0
SIGMA_RANGE = (0.02, 0.1)
TARGETS = {"fast_forward_backward_s_max": 0.4, "fast_vs_torch_min": 8.0, "fast_forward_evals_per_s_min": 1.2e9,
           "fast_peak_extra_mb_max": 150.0, "scale_peak_extra_mb_max": 2048.0}
SCALE = {"k": 300_000, "batch": 1, "shape": (256, 256, 256), "sigma_range": (0.002, 0.01)}


def useful_pairs(g: GaussianSet, shape) -> tuple[int, str]:
    conv = get_convention("paper")
    centres, prec, _ = render_inputs(g.detach(), conv)
    if numba_available():
        from medgmae_core.render.cpu_kernel import count_useful_pairs
        return count_useful_pairs(centres, prec, clip_boxes(g, shape, conv), shape, CUTOFF), "exact"
    scale = torch.tensor([n - 1 for n in shape], dtype=torch.float64)
    cov = g.covariances().double() * scale[:, None] * scale[None, :]
    vol = 4 / 3 * math.pi * CUTOFF ** 3 * torch.linalg.det(cov).clamp(min=0).sqrt()
    return int(vol.sum()), "estimate: ellipsoid volume, border clipping ignored"


def render_fn(renderer: str):
    if renderer == "reference":
        return lambda g, shape: render_reference(g, shape, cutoff=CUTOFF)
    return lambda g, shape: render_volume(g, shape, cutoff=CUTOFF, backend=renderer)


def measure(renderer: str, g: GaussianSet, shape, repeats: int, pairs: int) -> dict:
    render = render_fn(renderer)
    leaves = g.map(lambda t: t.detach().clone().requires_grad_())
    weight = torch.rand((g.batch_size, *shape), generator=torch.Generator().manual_seed(0), dtype=g.dtype)

    def forward():
        with torch.no_grad():
            render(g, shape)

    def forward_backward():
        for t in leaves.tensors():
            t.grad = None
        (render(leaves, shape) * weight).sum().backward()

    warmup = 0 if renderer == "reference" else 1  # nothing to compile or cache in the dense reference
    forward_s, forward_cpu_s = timed(forward, repeats, warmup)
    forward_backward_s, forward_backward_cpu_s = timed(forward_backward, repeats, warmup)
    release_free_memory()
    with PeakMemory() as mem:
        forward_backward()
    return {"renderer": renderer, "k": g.num_gaussians, "batch": g.batch_size, "shape": list(shape),
            "forward_s": forward_s, "forward_backward_s": forward_backward_s, "peak_extra_mb": mem.peak_extra_mb,
            "useful_pairs": pairs, "useful_evals_per_s": pairs / forward_s,
            "forward_cpu_s": forward_cpu_s, "forward_backward_cpu_s": forward_backward_cpu_s}


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``), so the next block's
    allocations show up in its resident-memory peak instead of reusing the warm-up's pages."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def timed(fn, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """(best wall seconds via ``best_of``, best process CPU seconds of the same calls).

    CPU seconds summed over threads show the work done even when other processes share the cores.
    """
    cpu = []

    def run():
        c0 = time.process_time()
        fn()
        cpu.append(time.process_time() - c0)

    wall = best_of(run, repeats=repeats, warmup=warmup)
    return wall, min(cpu[warmup:])


def projector_records(quick: bool) -> tuple[list, str]:
    path = Path(__file__).resolve().parent / "projector_bench.py"
    if not path.exists():
        return [], "benchmarks/projector_bench.py not present: no projector cases measured"
    spec = importlib.util.spec_from_file_location("projector_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.projector_cases(quick), "from benchmarks/projector_bench.py:projector_cases"


def scale_case(renderer: str) -> dict:
    g = GaussianSet.random(SCALE["batch"], SCALE["k"], sigma_range=SCALE["sigma_range"],
                           generator=torch.Generator().manual_seed(7))
    shape = SCALE["shape"]
    pairs, how = useful_pairs(g, shape)
    leaves = g.map(lambda t: t.requires_grad_())
    release_free_memory()
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        out = render_volume(leaves, shape, cutoff=CUTOFF, backend=renderer)
        forward_s = time.perf_counter() - t0
        out.sum().backward()
        total = time.perf_counter() - t0
        del out
    return {"renderer": renderer, "k": SCALE["k"], "batch": SCALE["batch"], "shape": list(shape),
            "sigma_range": list(SCALE["sigma_range"]), "forward_s": forward_s, "forward_backward_s": total,
            "peak_extra_mb": mem.peak_extra_mb, "useful_pairs": pairs, "useful_pairs_count": how,
            "target_peak_extra_mb_max": TARGETS["scale_peak_extra_mb_max"],
            "holds": mem.peak_extra_mb <= TARGETS["scale_peak_extra_mb_max"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output JSON file")
    parser.add_argument("--quick", action="store_true", help="fewer cases and repeats (smoke run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    fast = "numba" if numba_available() else "torch"
    load_start = os.getloadavg()
    grid = [(256, 1), (4096, 4)] if args.quick else [(k, b) for k in (256, 1024, 4096) for b in (1, 4)]
    repeats = 1 if args.quick else 3
    cases, ratios = [], []
    count_note = None
    for k, batch in grid:
        g = GaussianSet.random(batch, k, sigma_range=SIGMA_RANGE, generator=torch.Generator().manual_seed(k + batch))
        pairs, count_note = useful_pairs(g, SHAPE)
        renderers = [fast] + (["torch"] if fast != "torch" else [])
        if k == 256 and batch == 1:  # dense evaluation is minutes per call beyond this
            renderers.append("reference")
        by_name = {}
        for renderer in renderers:
            reps = 1 if renderer == "reference" else (repeats if renderer == fast else min(repeats, 2))
            rec = measure(renderer, g, SHAPE, reps, pairs)
            print(f"{renderer:9s} k={k:5d} B={batch} fwd {rec['forward_s']:.3f}s fwd+bwd "
                  f"{rec['forward_backward_s']:.3f}s peak {rec['peak_extra_mb']:.0f}MB "
                  f"{rec['useful_evals_per_s'] / 1e9:.2f} G evals/s", flush=True)
            cases.append(rec)
            by_name[renderer] = rec
        ratio = {"k": k, "batch": batch, "fast": fast}
        for other in ("torch", "reference"):
            if other in by_name and other != fast:
                ratio[f"{fast}_vs_{other}_forward"] = by_name[other]["forward_s"] / by_name[fast]["forward_s"]
                ratio[f"{fast}_vs_{other}_forward_backward"] = (by_name[other]["forward_backward_s"]
                                                                / by_name[fast]["forward_backward_s"])
        ratios.append(ratio)

    big = next(c for c in cases if c["renderer"] == fast and c["k"] == 4096 and c["batch"] == 4)
    big_ratio = next(r for r in ratios if r["k"] == 4096 and r["batch"] == 4)
    vs_torch = big_ratio.get(f"{fast}_vs_torch_forward_backward", float("nan"))
    targets = {
        "case": "k=4096, B=4, 96^3, fast path",
        "fast_forward_backward_s": {"value": big["forward_backward_s"], "max": TARGETS["fast_forward_backward_s_max"],
                                    "holds": big["forward_backward_s"] <= TARGETS["fast_forward_backward_s_max"]},
        "fast_vs_torch_forward_backward": {"value": vs_torch, "min": TARGETS["fast_vs_torch_min"],
                                           "holds": vs_torch >= TARGETS["fast_vs_torch_min"]},
        "fast_forward_useful_evals_per_s": {"value": big["useful_evals_per_s"],
                                            "min": TARGETS["fast_forward_evals_per_s_min"],
                                            "holds": big["useful_evals_per_s"] >= TARGETS["fast_forward_evals_per_s_min"]},
        "fast_peak_extra_mb": {"value": big["peak_extra_mb"], "max": TARGETS["fast_peak_extra_mb_max"],
                               "holds": big["peak_extra_mb"] <= TARGETS["fast_peak_extra_mb_max"]},
    }
    print("scale case: 300k Gaussians -> 256^3 ...", flush=True)
    scale = scale_case(fast)
    print(f"scale: fwd {scale['forward_s']:.2f}s fwd+bwd {scale['forward_backward_s']:.2f}s "
          f"peak {scale['peak_extra_mb']:.0f}MB", flush=True)
    targets["scale_peak_extra_mb"] = {"value": scale["peak_extra_mb"], "max": TARGETS["scale_peak_extra_mb_max"],
                                      "holds": scale["holds"]}
    projector, projector_note = projector_records(args.quick)
    write_json(args.out, {
        "benchmark": "render",
        "settings": {"shape": list(SHAPE), "cutoff": CUTOFF, "sigma_range": list(SIGMA_RANGE),
                     "rotations": "random (uniform unit quaternions)", "dtype": "float32", "quick": args.quick,
                     "torch_threads": torch.get_num_threads(), "numba_threads": get_num_threads(),
                     "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                     "reference_cases": "dense reference at k=256, B=1 only",
                     "fast_path": fast, "useful_evals": count_note,
                     "loss": "sum(render * fixed random weight); best-of timing",
                     "load_average_start_end": [list(load_start), list(os.getloadavg())],
                     "cpu_seconds_note": "forward_cpu_s / forward_backward_cpu_s: process CPU time (all threads) "
                                         "of the best call; wall times are inflated when the 2 cores are shared"},
        "cases": cases,
        "ratios": ratios,
        "targets": targets,
        "scale_case": scale,
        "projector_cases": projector,
        "projector_note": projector_note,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
