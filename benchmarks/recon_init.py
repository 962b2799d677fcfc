"""Zero-shot initialisation benchmark: 3DGR-CT from ``random``, ``fbp`` (the 3DGR-CT heuristic) and ``medgmae``.

    python benchmarks/recon_init.py --out recon_init.json [--checkpoint PATH] [--iters 300] [--quick]

One simulated cone-beam scan (120 views over 360 degrees, noiseless) of a shipped real CT
(``chest_cta_pulmonary_ct_cropped``, 1.5 mm, cropped and block-averaged to CPU scale), one FDK, then
the same fit (same FitConfig, same iteration budget, same seed for the random view subsets) from each
initialisation, in one run; ``fbp_matched`` repeats the FBP heuristic with medgmae's Gaussian count. Per initialisation: the PSNR curve (evaluated every ``--eval-every``
iterations; data range = max - min of the reference), iterations and seconds to reach PSNR 30 and 35 (and
a ladder of lower levels, since a CPU-scale budget may not reach 35), final PSNR/SSIM, the Gaussian
count, and the initialisation's own cost. Ratios are each init's iterations-to-target over ``fbp``'s
(the paper: 0.61 for MedGMAE at PSNR 35). Also: seconds per iteration with all 120 views per iteration.

The checkpoint: ``--checkpoint``, else the bundled ``medgmae_core/weights/demo_tiny.pt``; without either
the ``medgmae`` run is recorded as skipped. Whatever the checkpoint gives is reported as measured.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of, write_json  # noqa: E402

from medgmae_core.recon.cli import DEMO_WEIGHTS, analytic_reconstruction, default_max_intensity  # noqa: E402
from medgmae_core.recon.fit import FitConfig, GaussianParams, GeometryProjector, ReconstructionFit  # noqa: E402
from medgmae_core.recon.initialisation import calibrate_intensities, initialise  # noqa: E402
from medgmae_core.recon.io import simulate_from_ct  # noqa: E402
from medgmae_core.recon.metrics import psnr, ssim  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CT = REPO / ".." / "shared" / "data" / "ct" / "totalsegmentator" / "chest_cta_pulmonary_ct_cropped.nii.gz"
LADDER = (16.0, 18.0, 20.0, 22.0, 24.0, 26.0, 28.0, 30.0, 32.0, 35.0)


def first_reaching(history: list[dict], target: float) -> dict | None:
    for h in history:
        if h.get("psnr", -math.inf) >= target:
            return {"iteration": h["iteration"], "fit_seconds": h["seconds"]}
    return None


def run_init(method: str, data, fdk: torch.Tensor, cfg: FitConfig, *, num_gaussians: int, checkpoint,
             max_intensity: float, seed: int) -> dict:
    project = GeometryProjector(data.geometry)
    t0 = time.perf_counter()
    g = initialise(method, fbp_volume=fdk, extent_mm=data.geometry.volume_extent_mm, num_gaussians=num_gaussians,
                   checkpoint=checkpoint, mu_water=data.mu_water, seed=seed)
    g, gain = calibrate_intensities(g, lambda gs: project(gs), data.projections)
    init_seconds = time.perf_counter() - t0
    params = GaussianParams.from_gaussians(g, max_intensity)
    fit = ReconstructionFit(params, data.projections, project, data.volume_shape, cfg, reference=data.reference)
    t1 = time.perf_counter()
    fit.run(on_progress=lambda e: print(f"  {method:8s} it {e['iteration']:4d}  psnr {e.get('psnr', float('nan')):6.2f}"
                                          f"  n {e['num_gaussians']}", flush=True))
    wall = time.perf_counter() - t1
    final = fit.final_metrics()
    hist = fit.result.history
    ladder = {f"{t:g}": first_reaching(hist, t) for t in LADDER}
    out = {
        "method": method, "initial_gaussians": g.num_gaussians, "intensity_gain": gain,
        "init_seconds": init_seconds, "init_psnr": hist[0].get("psnr"),
        "final_psnr": final["psnr"], "final_ssim": final["ssim"], "final_gaussians": final["num_gaussians"],
        "fit_seconds": final["fit_seconds"], "wall_seconds_with_eval": wall,
        "seconds_per_iteration": final["fit_seconds"] / max(1, final["iterations"]),
        "iterations_to_psnr30": final["iterations_to_psnr30"], "seconds_to_psnr30": final["seconds_to_psnr30"],
        "iterations_to_psnr35": final["iterations_to_psnr35"], "seconds_to_psnr35": final["seconds_to_psnr35"],
        "ladder": ladder, "history": [{k: h[k] for k in ("iteration", "seconds", "psnr", "num_gaussians")}
                                      for h in hist],
        "densify_log": fit.result.densify_log,
    }
    out["_gaussians"] = fit.params.gaussians().detach()
    return out


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--ct", default=str(DEFAULT_CT))
    ap.add_argument("--crop", default="13:109,3:99,40:72", help="CT crop before downsampling (voxels)")
    ap.add_argument("--downsample", type=int, default=2)
    ap.add_argument("--views", type=int, default=120)
    ap.add_argument("--views-per-iter", type=int, default=10)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--num-gaussians", type=int, default=1500, help="initial count for random and fbp")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--checkpoint-note", default=None, help="where the checkpoint came from (stored in the JSON)")
    ap.add_argument("--inits", default="random,fbp,medgmae,fbp_matched",
                    help="fbp_matched: the FBP heuristic with as many Gaussians as medgmae predicted (a control "
                         "separating where Gaussians start from how many there are)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny budget, to check the script runs")
    args = ap.parse_args()
    if args.quick:
        args.iters, args.eval_every, args.num_gaussians, args.views_per_iter = 20, 10, 500, 10

    data = simulate_from_ct(args.ct, crop=args.crop, downsample=args.downsample, geometry="cone", views=args.views)
    print(f"scan: {data.volume_shape} voxels at {[round(s, 2) for s in data.spacing_mm]} mm, cone beam, "
          f"{data.geometry.n_views} views, detector {data.geometry.detector_shape}", flush=True)
    t0 = time.perf_counter()
    fdk = analytic_reconstruction(data, "ram-lak")
    fdk_seconds = time.perf_counter() - t0
    rng = float(data.reference.max() - data.reference.min())
    max_intensity = default_max_intensity(fdk)
    cfg = FitConfig(iters=args.iters, eval_every=args.eval_every, views_per_iter=args.views_per_iter,
                    seed=args.seed)
    checkpoint = Path(args.checkpoint) if args.checkpoint else (DEMO_WEIGHTS if DEMO_WEIGHTS.exists() else None)

    runs: dict[str, dict] = {}
    for method in [m.strip() for m in args.inits.split(",") if m.strip()]:
        if (method.startswith("medgmae") or method == "fbp_matched") and checkpoint is None:
            runs[method] = {"method": method, "skipped": "no checkpoint (--checkpoint or bundled demo_tiny.pt)"}
            continue
        count = args.num_gaussians
        if method == "fbp_matched":
            mg = runs.get("medgmae", {})
            if "initial_gaussians" not in mg:
                runs[method] = {"method": method, "skipped": "needs a medgmae run first"}
                continue
            count = mg["initial_gaussians"]
        print(f"{method}:", flush=True)
        try:
            runs[method] = run_init("fbp" if method == "fbp_matched" else method, data, fdk, cfg,
                                    num_gaussians=count, checkpoint=checkpoint if method.startswith("medgmae") else None,
                                    max_intensity=max_intensity, seed=args.seed)
            runs[method]["method"] = method
            if method.startswith("medgmae"):
                from medgmae_core.train.checkpoint import load_checkpoint

                ck = load_checkpoint(checkpoint)
                runs[method]["checkpoint_step"] = ck.get("step")
                runs[method]["checkpoint_model"] = ck.get("model_config", {}).get("name")
        except (ValueError, FileNotFoundError) as exc:  # e.g. a checkpoint whose Gaussians miss the volume
            runs[method] = {"method": method, "failed": f"{type(exc).__name__}: {exc}"}

    # seconds per iteration with all 120 views, at the fbp run's final Gaussian count
    timing = {}
    src = runs.get("fbp") or next((r for r in runs.values() if "_gaussians" in r), None)
    if src is not None and "_gaussians" in src:
        g = src["_gaussians"]
        full = FitConfig(iters=10_000, eval_every=10_000, densify_every=10_000, views_per_iter=None)
        fit = ReconstructionFit(GaussianParams.from_gaussians(g, max_intensity), data.projections,
                                GeometryProjector(data.geometry), data.volume_shape, full, reference=None)
        step = {"i": 0}

        def one() -> None:
            fit.step(step["i"])
            step["i"] += 1

        timing = {"views": data.geometry.n_views, "num_gaussians": g.num_gaussians,
                  "seconds_per_iteration": best_of(one, repeats=3, warmup=1),
                  "detector": list(data.geometry.detector_shape)}

    def ratios_to(ref: dict, names) -> dict:
        out = {}
        for name in names:
            r = runs.get(name, {})
            if "ladder" in r and "ladder" in ref:
                out[name] = ratio_block(r, ref)
        return out

    def ratio_block(r: dict, ref: dict) -> dict:
        return {
            "iterations_to_psnr35": ratio(r["iterations_to_psnr35"], ref["iterations_to_psnr35"]),
            "iterations_to_psnr30": ratio(r["iterations_to_psnr30"], ref["iterations_to_psnr30"]),
            "seconds_to_psnr35": ratio(r["seconds_to_psnr35"], ref["seconds_to_psnr35"]),
            "seconds_to_psnr30": ratio(r["seconds_to_psnr30"], ref["seconds_to_psnr30"]),
            "ladder_iterations": {t: ratio((r["ladder"][t] or {}).get("iteration"), (ref["ladder"][t] or {}).get("iteration"))
                                  for t in r["ladder"]},
        }

    ratios = ratios_to(runs.get("fbp", {}), [n for n in runs if n != "fbp"])
    ratios_matched = ratios_to(runs.get("fbp_matched", {}), ["medgmae"])
    for r in runs.values():
        r.pop("_gaussians", None)
    write_json(args.out, {
        "benchmark": "recon_init",
        "ct": str(Path(args.ct).name), "crop": args.crop, "downsample": args.downsample,
        "volume_shape": list(data.volume_shape), "spacing_mm": list(data.spacing_mm),
        "geometry": "cone", "views": data.geometry.n_views, "detector": list(data.geometry.detector_shape),
        "source_to_origin_mm": data.geometry.source_to_origin, "source_to_detector_mm": data.geometry.source_to_detector,
        "views_per_iter": args.views_per_iter, "iters": args.iters, "eval_every": args.eval_every,
        "psnr_data_range": rng, "fdk_psnr": psnr(fdk, data.reference, rng), "fdk_ssim": ssim(fdk, data.reference, rng),
        "fdk_seconds": fdk_seconds, "max_intensity": max_intensity,
        "checkpoint": str(checkpoint) if checkpoint else None, "checkpoint_note": args.checkpoint_note,
        "fit_config": cfg.to_dict(), "runs": runs, "ratios_to_fbp": ratios,
        "ratios_to_fbp_matched": ratios_matched,
        "paper_ratio_iterations_to_psnr35": 0.61, "timing_all_views": timing,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
