"""Interactive-speed and scale benchmark (issue 7): one record per target, each with ``holds``.

    python benchmarks/interactive.py --out interactive.json [--quick] [--skip-scale]

Records (``records`` in the JSON), each with ``seconds``, ``peak_extra_mb``, ``target`` and ``holds``:

* ``model_load``: ``train.checkpoint.load_model`` of the demo checkpoint (reported, not a target);
* ``predict_window_glyphs``: from a prepared CT in memory, predict one 96^3 window and build its glyph polydata
  in RAS (<= 2 s, model load excluded);
* ``whole_ct_512x512x300``: a synthetic 512x512x300 CT at 0.8x0.8x1.5 mm, prepared (RAS, 1.5 mm, HU window),
  sliding windows with overlap, merged into one Gaussian set in RAS (<= 60 s); ``whole_ct_largest_real`` does
  the same for the largest real CT in ``../shared/data/ct`` (reported against the same target);
* ``glyphs_20k``: glyph polydata for 20k Gaussians (<= 0.5 s), plus the vtkTensorGlyph reference time;
* ``render_300k_256``: 300k Gaussians into 256^3, forward + backward (<= 2 GB extra; time reported), measured by
  ``benchmarks/render.py:scale_case``;
* ``projector_300k_120x256``: the same 300k Gaussians through the analytic projector, 120 parallel-beam views of
  256x256, forward + backward (<= 2 GB extra; time reported), measured by ``benchmarks/projector_bench.py:scale_case``
  when present (else by an equivalent case here).

Model: the bundled demo weights when present, else a randomly initialised ``tiny`` model saved through the
checkpoint module (same architecture and cost; the record says which).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import PeakMemory, best_of, write_json  # noqa: E402

from medgmae_core import inference, spatial  # noqa: E402
from medgmae_core.gaussians import GaussianSet  # noqa: E402

SHARED_CT = (HERE.parent / ".." / "shared" / "data" / "ct").resolve()
TARGETS = {"predict_window_glyphs": {"seconds_max": 2.0}, "whole_ct": {"seconds_max": 60.0},
           "glyphs_20k": {"seconds_max": 0.5}, "render_300k_256": {"peak_extra_mb_max": 2048.0},
           "projector_300k_120x256": {"peak_extra_mb_max": 2048.0}}


def holds(values: dict, target: dict) -> bool:
    ok = True
    if "seconds_max" in target:
        ok &= values["seconds"] <= target["seconds_max"]
    if "peak_extra_mb_max" in target:
        ok &= values["peak_extra_mb"] <= target["peak_extra_mb_max"]
    return bool(ok)


def record(name: str, seconds: float, peak_mb: float, target: dict | None, **extra) -> dict:
    rec = {"name": name, "seconds": round(float(seconds), 4), "peak_extra_mb": round(float(peak_mb), 1),
           "target": target}
    rec["holds"] = holds(rec, target) if target else None
    rec.update(extra)
    print(f"{name:<28} {rec['seconds']:>9.3f} s {rec['peak_extra_mb']:>8.1f} MB  holds={rec['holds']}", flush=True)
    return rec


def demo_checkpoint(tmp: Path) -> tuple[Path, str]:
    from medgmae_core.train.checkpoint import BUNDLED_WEIGHTS

    if BUNDLED_WEIGHTS.is_file():
        return BUNDLED_WEIGHTS, f"bundled {BUNDLED_WEIGHTS.name}"
    from medgmae_core.model import build_model, get_config
    from medgmae_core.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    path = save_checkpoint(tmp / "tiny_random.pt", model=build_model(get_config("tiny")))
    return path, "random-init tiny (bundled weights not present yet)"


def synthetic_ct(shape=(512, 512, 300), seed: int = 0) -> np.ndarray:
    """CT-like HU volume: air, an elliptic body of soft tissue with fat, organs, a spine and noise."""
    rng = np.random.default_rng(seed)
    i = np.linspace(-1, 1, shape[0], dtype=np.float32)[:, None]
    j = np.linspace(-1, 1, shape[1], dtype=np.float32)[None, :]
    body = (i / 0.85) ** 2 + (j / 0.65) ** 2
    plane = np.where(body < 1, np.where(body > 0.8, -100.0, 40.0), -1000.0).astype(np.float32)
    plane[(((i + 0.35) / 0.3) ** 2 + ((j - 0.1) / 0.25) ** 2) < 1] = 100.0  # liver
    plane[((i / 0.08) ** 2 + ((j + 0.45) / 0.08) ** 2) < 1] = 700.0  # spine
    hu = np.empty(shape, dtype=np.float32)
    hu[...] = plane[:, :, None]
    hu += rng.standard_normal(shape, dtype=np.float32) * 20.0
    return hu


def bench_predict_window(model, prepared, repeats: int) -> dict:
    from medgmae_core.export.glyphs import gaussian_glyph_polydata

    def run():
        pred = inference.predict_window(model, prepared)
        centres, axes = spatial.gaussians_to_world(pred.gaussians, prepared.shape, prepared.ijk_to_ras)
        return gaussian_glyph_polydata(centres, axes, pred.gaussians.intensities[0].numpy())

    with PeakMemory() as mem:
        seconds = best_of(run, repeats=repeats, warmup=1)
    poly = run()
    from medgmae_core.render import render_volume

    window = inference.predict_window(model, prepared).window_gaussians
    render_s = best_of(lambda: render_volume(window, model.config.img_size), repeats=repeats, warmup=1)
    return record("predict_window_glyphs", seconds, mem.peak_extra_mb, TARGETS["predict_window_glyphs"],
                  gaussians=window.num_gaussians, glyph_points=poly.GetNumberOfPoints(),
                  window=list(model.config.img_size), render_window_s_not_in_target=round(render_s, 4))


def bench_whole_ct(name: str, model, hu: np.ndarray, affine: np.ndarray, *, overlap: int, batch: int) -> dict:
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        prepared = inference.prepare_ct(hu, affine)
        t_prep = time.perf_counter() - t0
        result = inference.predict_volume(model, prepared, overlap=overlap, batch_size=batch)
        t_pred = time.perf_counter() - t0 - t_prep
        centres, axes = spatial.gaussians_to_world(result.gaussians, prepared.shape, prepared.ijk_to_ras)
        seconds = time.perf_counter() - t0
    return record(name, seconds, mem.peak_extra_mb, TARGETS["whole_ct"], source_shape=list(hu.shape),
                  source_spacing_mm=[round(float(s), 4) for s in spatial.spacing_of(affine)],
                  prepared_shape=list(prepared.shape), windows=len(result.grid), overlap=overlap, batch=batch,
                  gaussians=int(result.gaussians.num_gaussians), prepare_s=round(t_prep, 3),
                  predict_merge_s=round(t_pred, 3), to_ras_s=round(seconds - t_prep - t_pred, 3))


def largest_real_ct() -> tuple[str, np.ndarray, np.ndarray] | None:
    from medgmae_core.export.nifti import read_volume_array

    candidates = [p for p in SHARED_CT.glob("**/*ct*.nii.gz")] + [p for p in SHARED_CT.glob("**/*dicom*") if p.is_dir()]
    best = None
    for path in candidates:
        try:
            from medgmae_core.data.readers import read_header

            size = math.prod(read_header(path).shape)
        except Exception:
            continue
        if best is None or size > best[0]:
            best = (size, path)
    if best is None:
        return None
    hu, affine = read_volume_array(best[1], what="CT")
    return str(best[1].relative_to(SHARED_CT)), hu.astype(np.float32), affine


def bench_glyphs(n: int, repeats: int) -> dict:
    from medgmae_core.export.glyphs import gaussian_glyph_polydata

    gs = GaussianSet.random(1, n, sigma_range=(0.002, 0.02), generator=torch.Generator().manual_seed(3))
    affine = np.diag([0.8, 0.8, 1.5, 1.0])

    def run(method="auto"):
        centres, axes = spatial.gaussians_to_world(gs, (512, 512, 300), affine)
        return gaussian_glyph_polydata(centres, axes, gs.intensities[0].numpy(), method=method)

    t0 = time.perf_counter()
    run()  # the first call compiles (or loads from the numba cache) the fused kernel
    first = time.perf_counter() - t0
    with PeakMemory() as mem:
        seconds = best_of(run, repeats=repeats, warmup=1)
    numpy_path = best_of(lambda: run("numpy"), repeats=repeats, warmup=0)
    reference = best_of(lambda: run("vtk"), repeats=1, warmup=0)
    poly = run()
    return record("glyphs_20k" if n == 20000 else f"glyphs_{n}", seconds, mem.peak_extra_mb, TARGETS["glyphs_20k"],
                  gaussians=n, points=poly.GetNumberOfPoints(), triangles=poly.GetNumberOfCells(),
                  first_call_s=round(first, 3), numpy_path_s=round(numpy_path, 4),
                  vtk_tensor_glyph_reference_s=round(reference, 4))


def _load_module(name: str):
    path = HERE / f"{name}.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_render_scale() -> dict:
    from medgmae_core.render import resolve_backend

    module = _load_module("render")
    probe = GaussianSet.random(1, 2)
    backend = resolve_backend(probe, "auto")
    if module is not None and hasattr(module, "scale_case"):
        case = module.scale_case(backend)
        return record("render_300k_256", case["forward_backward_s"], case["peak_extra_mb"],
                      TARGETS["render_300k_256"], backend=backend, forward_s=round(case["forward_s"], 3),
                      measured_by="benchmarks/render.py:scale_case", k=case["k"], shape=case["shape"],
                      sigma_range=case["sigma_range"])
    from medgmae_core.render import render_volume

    g = GaussianSet.random(1, 300_000, sigma_range=(0.002, 0.01), generator=torch.Generator().manual_seed(7))
    leaves = g.map(lambda t: t.requires_grad_())
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        out = render_volume(leaves, (256, 256, 256), backend=backend)
        forward = time.perf_counter() - t0
        out.sum().backward()
        seconds = time.perf_counter() - t0
        del out
    return record("render_300k_256", seconds, mem.peak_extra_mb, TARGETS["render_300k_256"], backend=backend,
                  forward_s=round(forward, 3), measured_by="benchmarks/interactive.py")


def bench_projector_scale(k: int = 300_000, views: int = 120, det: int = 256) -> dict:
    from medgmae_core.xray.gaussian_projector import project_gaussians, resolve_backend

    module = _load_module("projector_bench")
    if module is not None and hasattr(module, "scale_case") and (k, views, det) == (300_000, 120, 256):
        case = module.scale_case()
        return record("projector_300k_120x256", case["forward_backward_s"], case["peak_extra_mb"],
                      TARGETS["projector_300k_120x256"], backend=resolve_backend(GaussianSet.random(1, 2), "auto"),
                      forward_s=round(case["forward_s"], 3), measured_by="benchmarks/projector_bench.py:scale_case",
                      k=case["k"], views=case["views"], detector=case["detector"])
    from medgmae_core.xray.geometry import ParallelBeam, evenly_spaced_angles

    extent = (256.0, 256.0, 256.0)  # a 256^3 volume at 1 mm
    spacing = math.hypot(extent[0], extent[1]) / (det - 1)  # columns cover the in-plane diagonal
    geom = ParallelBeam(angles=evenly_spaced_angles(views, math.pi), detector_shape=(det, det),
                        detector_spacing=(extent[2] / (det - 1), spacing), volume_extent_mm=extent)
    g = GaussianSet.random(1, k, sigma_range=(0.002, 0.01), generator=torch.Generator().manual_seed(7))
    leaves = g.map(lambda t: t.requires_grad_())
    backend = resolve_backend(g, "auto")
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        out = project_gaussians(leaves, geom, backend=backend)
        forward = time.perf_counter() - t0
        out.sum().backward()
        seconds = time.perf_counter() - t0
        del out
    return record(f"projector_{k // 1000}k_{views}x{det}", seconds, mem.peak_extra_mb,
                  TARGETS["projector_300k_120x256"], backend=backend, forward_s=round(forward, 3), k=k, views=views,
                  detector=[det, det])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON output path")
    parser.add_argument("--quick", action="store_true", help="smaller whole-CT case (256x256x150), fewer repeats")
    parser.add_argument("--skip-scale", action="store_true", help="skip the 300k renderer / projector cases")
    parser.add_argument("--overlap", type=int, default=inference.DEFAULT_OVERLAP)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice; 1 is steadier on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from medgmae_core.data.phantom import make_phantom
    from medgmae_core.train.checkpoint import load_model

    repeats = 1 if args.quick else 3
    load_start = os.getloadavg()
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, weights_note = demo_checkpoint(Path(tmp))
        load_model(ckpt)  # warm the imports, then time a clean load
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            model, config = load_model(ckpt)
            load_s = time.perf_counter() - t0
        records.append(record("model_load", load_s, mem.peak_extra_mb, None, weights=weights_note,
                              config=config.name if hasattr(config, "name") else None))
    torch.set_grad_enabled(False)
    ph = make_phantom()
    prepared = inference.prepare_ct(ph.hu, ph.affine)
    records.append(bench_predict_window(model, prepared, repeats))
    records.append(bench_glyphs(20000, repeats))
    shape = (256, 256, 150) if args.quick else (512, 512, 300)
    hu = synthetic_ct(shape)
    records.append(bench_whole_ct(f"whole_ct_{'x'.join(map(str, shape))}", model, hu, np.diag([0.8, 0.8, 1.5, 1.0]),
                                  overlap=args.overlap, batch=args.batch))
    del hu
    real = largest_real_ct()
    if real is not None:
        name, hu, affine = real
        records.append(bench_whole_ct("whole_ct_largest_real", model, hu, affine, overlap=args.overlap,
                                      batch=args.batch))
        records[-1]["source"] = name
    torch.set_grad_enabled(True)
    if not args.skip_scale:
        records.append(bench_render_scale())
        records.append(bench_projector_scale())
    write_json(args.out, {"benchmark": "interactive", "weights": weights_note, "torch_threads": torch.get_num_threads(),
                          "load_average_1_5_15min": {"start": [round(v, 2) for v in load_start],
                                                     "end": [round(v, 2) for v in os.getloadavg()]},
                          "records": records,
                          "targets": TARGETS, "all_hold": all(r["holds"] for r in records if r["holds"] is not None)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
