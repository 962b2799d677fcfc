"""Reconstruction benchmark (issue 11): Gaussian fits against FDK and RTK, and what each initialisation buys.

    python benchmarks/recon_init.py --out bench_out/recon_init.json                 # full: 96^3, 120 + 40 views
    python benchmarks/recon_init.py --out bench_out/recon_init_quick.json --quick   # 21 min on one thread at load ~6
    python benchmarks/recon_init.py --out ... --inits medgmae,medgmae* --checkpoint new.pt   # rerun for new weights

Volumes (``--volumes``): ``chest_cta``, a 96^3 window at 1.5 mm of the chest CTA
``../shared/data/ct/totalsegmentator/chest_cta_pulmonary_ct_cropped.nii.gz`` (the held-out real CT), and
``phantom``, a 96^3 procedural phantom at 1.5 mm with a seed the training phantoms do not use (1001).
Whether the checkpoint saw them is checked against the training list it records (:func:`held_out`).
Scans: simulated cone beam (noiseless), ``--views`` (default 120 and 40) over 360 degrees.
Per scan, in one run: our FDK, RTK's FDK and SART (``benchmarks/rtk_baselines.py``, optional extra
``[bench]``; recorded as skipped without it), our own SIRT on the voxel projector that made the scan
(``benchmarks/sirt_baseline.py``: RTK's Joseph projector differs from ours by ~5%, which makes its SART drift
on our data), then the same 3DGR-CT fit (same FitConfig, seed, view subsets,
``--iters``, xyz lr on the fixed ``--lr-horizon``) from each initialisation in ``--inits``: ``random``,
``3dgr`` (3DGR-CT's create_from_fbp), ``fbp`` (our heuristic), ``medgmae``, ``medgmae*`` (zero-shot, the
checkpoint's prediction with the offset + residual conversion), ``oracle`` (a direct image-domain fit to
the windowed ground truth, pushed through the same conversion: what a perfect model would give) and
``fbp_prefit``, the control without a model: the ``fbp`` heuristic fitted to the FDK in the image domain for
``--residual-fit-iters`` steps, the same pre-fit the zero-shot residual set gets (what the model adds is the
difference between ``medgmae`` and this). Every init starts from ``--num-gaussians`` Gaussians.

Outputs: the JSON (every PSNR/SSIM history, iterations and seconds to FDK, FDK + 2/4 dB, 30 and 35 dB, the
ratio table: iterations to reach the ``3dgr`` run's final PSNR over ``3dgr``'s own, the paper's 0.61 beside
it), a PNG of PSNR against iterations and seconds and SSIM against iterations (``--out`` with ``.png``), the
speed check (one fit iteration at 50k Gaussians with 10 views of 128^2) and the machine load.
``--quick``: 48^3 windows (the same fields of view at 3 mm), 40 views, 150 iterations, no 120-view scan.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402

from medgmae_core.recon.fit import FitConfig, GaussianParams, GeometryProjector, ReconstructionFit  # noqa: E402
from medgmae_core.recon.initialisation import (analytic_reconstruction, calibrate_intensities,  # noqa: E402
                                               default_max_intensity, fbp_to_window, fit_to_volume, init_fbp,
                                               initialise_calibrated)
from medgmae_core.recon.simulation import MU_WATER, hu_to_mu, load_ct_volume, simulate_scan  # noqa: E402
from medgmae_core.recon.metrics import first_reaching, progress_against_baseline, psnr, ssim  # noqa: E402
from medgmae_core.train.checkpoint import bundled_weights  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / ".." / "shared" / "data" / "ct" / "totalsegmentator"
CHEST_CTA = SHARED / "chest_cta_pulmonary_ct_cropped.nii.gz"
CHEST_CROP = "13:109,3:99,8:104"  # a 96^3 window (1.5 mm) of the 122x102x112 volume
PHANTOM_SEED = 1001
PAPER_RATIO = 0.61
ALL_INITS = ("random", "3dgr", "fbp", "fbp_prefit", "medgmae", "medgmae*", "oracle")


# ------------------------------------------------------------------ hold-out check
def training_inputs(checkpoint: dict) -> list[str] | None:
    """What a checkpoint was trained on: ``train_config["data"]`` and/or a ``training_data`` list (top level or in
    ``extra``). None when it records neither."""
    found: list[str] = []
    data = (checkpoint.get("train_config") or {}).get("data")
    if data is not None:
        found += [str(d) for d in (data if isinstance(data, (list, tuple)) else [data])]
    for holder in (checkpoint, checkpoint.get("extra") or {}):
        listed = holder.get("training_data")
        if listed is not None:
            found += [str(d) for d in listed]
    return found or None


def _stem(name: str) -> str:
    base = Path(name).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def held_out(volume: str, training: list[str] | None, *, phantom_seed: int | None = None) -> dict:
    """Is ``volume`` (a path, or ``phantom`` with ``phantom_seed``) outside the training list?

    ``status``: ``held-out``, ``in training set`` (with the matching ``entry``) or ``unknown`` (no list).
    A path matches an entry naming the same file, a folder containing it, or the same file name; a phantom
    matches ``phantom_<seed>`` case names, and ``phantom[:N]`` specs (seeds 0..N-1)."""
    if training is None:
        return {"status": "unknown", "reason": "the checkpoint records no training list"}
    if phantom_seed is not None:
        for entry in training:
            if entry in (f"phantom_{phantom_seed:04d}", f"phantom_{phantom_seed}"):
                return {"status": "in training set", "entry": entry}
            if entry == "phantom" or entry.startswith("phantom:"):
                n = 8 if entry == "phantom" else int(entry.split(":", 1)[1] or 8)
                if phantom_seed < n:
                    return {"status": "in training set", "entry": entry}
        return {"status": "held-out", "phantom_seed": phantom_seed}
    path = Path(volume).resolve()
    for entry in training:
        p = Path(entry)
        try:
            rp = p.resolve()
        except OSError:
            rp = p
        if rp == path or (rp.is_dir() and rp in path.parents) or _stem(entry) == _stem(str(path)):
            return {"status": "in training set", "entry": entry}
    return {"status": "held-out"}


# ----------------------------------------------------------------------- volumes
def load_volume(name: str, downsample: int) -> tuple[torch.Tensor, tuple[float, float, float], str]:
    if name == "chest_cta":
        hu, _ = load_ct_volume(CHEST_CTA, crop=CHEST_CROP, downsample=downsample)
        source = str(CHEST_CTA)
    elif name == "phantom":
        from medgmae_core.data.phantom import make_phantom

        n = 96 // downsample
        hu = make_phantom((n, n, n), 1.5 * downsample, seed=PHANTOM_SEED).hu
        source = f"phantom seed {PHANTOM_SEED}"
    else:
        raise ValueError(f"unknown volume {name!r}; use chest_cta or phantom")
    return torch.from_numpy(hu_to_mu(hu)).float(), (1.5 * downsample,) * 3, source


# ------------------------------------------------------------------------ runs
def fit_run(method: str, data, fdk, cfg: FitConfig, *, num_gaussians, checkpoint, prediction, max_intensity,
            residual_fit_iters: int, seed: int, fdk_psnr: float, rng: float) -> dict:
    project = GeometryProjector(data.geometry)
    if method == "fbp_prefit":  # the control: the zero-shot path's image-domain pre-fit without any model
        t0 = time.perf_counter()
        g = fit_to_volume(fdk, init_fbp(fdk, data.geometry.volume_extent_mm, num_gaussians, uniform_weight=1.0,
                                        seed=seed), residual_fit_iters, seed=seed)
        g, gain = calibrate_intensities(g, lambda x: project(x), data.projections)
        info = {"intensity_gain": gain, "initial_gaussians": g.num_gaussians, "prefit_iters": residual_fit_iters,
                "init_seconds": time.perf_counter() - t0}
    else:
        g, info = initialise_calibrated(
            "oracle" if method == "oracle" else method, fbp_volume=fdk, extent_mm=data.geometry.volume_extent_mm,
            project=lambda x: project(x), measured=data.projections, num_gaussians=num_gaussians,
            checkpoint=checkpoint, mu_water=data.mu_water, seed=seed, prediction=prediction,
            residual_fit_iters=residual_fit_iters)
    fit = ReconstructionFit(GaussianParams.from_gaussians(g, max_intensity), data.projections, project,
                            data.volume_shape, cfg, reference=data.reference, data_range=rng)
    ssims = []

    def on_progress(e):
        if e["iteration"] % (cfg.eval_every * 2) == 0 or e["iteration"] == cfg.iters:
            ssims.append({"iteration": e["iteration"], "ssim": ssim(fit.volume(), data.reference, rng)})
        print(f"    {method:8s} it {e['iteration']:5d}  psnr {e.get('psnr', float('nan')):6.2f}  "
              f"n {e['num_gaussians']}  {e['seconds']:.0f}s", flush=True)

    fit.run(on_progress=on_progress)
    final = fit.final_metrics()
    hist = [{k: h[k] for k in ("iteration", "seconds", "psnr", "num_gaussians")} for h in fit.result.history]
    return {"method": method, **{k: v for k, v in info.items() if isinstance(v, (int, float, str))},
            "init_psnr": hist[0]["psnr"], "final_psnr": final["psnr"], "final_ssim": final["ssim"],
            "psnr_over_fdk": final["psnr"] - fdk_psnr, "final_gaussians": final["num_gaussians"],
            "fit_seconds": final["fit_seconds"], "seconds_per_iteration": final["fit_seconds"] / max(1, cfg.iters),
            **progress_against_baseline(hist, fdk_psnr), "history": hist, "ssim_history": ssims,
            "densify_log": fit.result.densify_log}


def oracle_prediction(reference: torch.Tensor, extent_mm, count: int, iters: int, seed: int):
    """A direct fit of the windowed ground truth (windowed units, paper convention) and the window's ends."""
    v, lo, hi = fbp_to_window(reference, MU_WATER)
    t0 = time.perf_counter()
    pred = fit_to_volume(v, init_fbp(v, extent_mm, count, uniform_weight=1.0, seed=seed), iters, seed=seed)
    from medgmae_core.render import render_volume

    own = psnr(render_volume(pred, tuple(v.shape))[0], v, 1.0)
    return (pred, lo, hi), {"oracle_fit_psnr_windowed": own, "oracle_fit_seconds": time.perf_counter() - t0,
                            "oracle_gaussians": count, "oracle_fit_iters": iters}


def rtk_runs(data, rng: float, sart_iters: int) -> dict:
    try:
        import rtk_baselines as rb
    except ImportError as exc:
        return {"skipped": f"benchmarks/rtk_baselines.py: {exc}"}
    why = rb.available()
    if why is not None:
        return {"skipped": f"RTK (pip install itk-rtk, extra [bench]) not importable: {why}"}
    ref = data.reference.numpy()
    proj = data.projections.numpy()
    out = {"version": _rtk_version()}
    try:
        out["forward_model_rel_diff"] = rb.check_mapping(ref, data.spacing_mm, data.geometry, proj)
        vol, sec = rb.fdk(proj, data.geometry, data.volume_shape, data.spacing_mm)
        out["fdk"] = {"psnr": psnr(torch.from_numpy(vol), data.reference, rng),
                      "ssim": ssim(torch.from_numpy(vol), data.reference, rng), "seconds": sec}
        if sart_iters <= 0:
            return out
        vol, sec, hist = rb.sart(proj, data.geometry, data.volume_shape, data.spacing_mm, iterations=sart_iters,
                                 callback=lambda v, it, s: {"iteration": it, "seconds": s,
                                                            "psnr": psnr(torch.from_numpy(v), data.reference, rng)})
        best = max(hist, key=lambda h: h["psnr"])
        out["sart"] = {"iterations": sart_iters, "lambda": 0.3, "psnr": hist[-1]["psnr"],
                       "ssim": ssim(torch.from_numpy(vol), data.reference, rng), "seconds": sec,
                       "best_psnr": best["psnr"], "best_iteration": best["iteration"], "history": hist}
    except Exception as exc:  # report, never hide
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def sirt_run(data, rng: float, iters: int) -> dict:
    from sirt_baseline import sirt

    every = max(1, iters // 10)
    vol, sec, hist = sirt(data.projections, data.geometry, data.volume_shape, iterations=iters,
                          callback=lambda v, it, s: {"iteration": it, "seconds": s,
                                                     "psnr": psnr(v, data.reference, rng)}
                          if it % every == 0 or it == iters else None)
    hist = [h for h in hist if h]
    best = max(hist, key=lambda h: h["psnr"])
    return {"iterations": iters, "psnr": hist[-1]["psnr"], "ssim": ssim(vol, data.reference, rng), "seconds": sec,
            "best_psnr": best["psnr"], "best_iteration": best["iteration"], "history": hist}


def _rtk_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("itk-rtk")
    except Exception:
        return None


def speed_check(num_gaussians: int = 50_000, views: int = 10, detector: int = 128) -> dict:
    """Seconds for one fit iteration (project, backward, Adam) at ``num_gaussians`` with ``views`` of
    ``detector``^2, Gaussians about one voxel wide in a 96^3, 1.5 mm volume."""
    from medgmae_core.gaussians import GaussianSet
    from medgmae_core.xray.geometry import ConeBeam

    base = ConeBeam.for_volume((96, 96, 96), (1.5, 1.5, 1.5), views)
    scale = max(base.detector_shape) * base.detector_spacing[1] / detector
    geom = ConeBeam(angles=base.angles, detector_shape=(detector, detector),
                    detector_spacing=(scale, scale), volume_extent_mm=base.volume_extent_mm,
                    source_to_origin=base.source_to_origin, source_to_detector=base.source_to_detector)
    gen = torch.Generator().manual_seed(0)
    k = int(num_gaussians)
    centres = 0.15 + 0.7 * torch.rand(1, k, 3, generator=gen)
    sigma = (0.6 + 0.8 * torch.rand(1, k, 1, generator=gen)) / 95.0
    g = GaussianSet.isotropic(centres, sigma.expand(1, k, 3)[..., 0], 0.01 * torch.rand(1, k, generator=gen))
    measured = torch.zeros(1, views, detector, detector)
    cfg = FitConfig(iters=100, eval_every=100, densify_from=1000)
    fit = ReconstructionFit(GaussianParams.from_gaussians(g, 0.05), measured, GeometryProjector(geom),
                            (96, 96, 96), cfg)
    fit.step(0)
    times, cpu = [], []
    for i in range(1, 6):
        t0, c0 = time.perf_counter(), time.process_time()
        fit.step(i)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    # on a shared machine the wall time depends on the load; the CPU time of this (one-thread) process is what
    # the iteration costs on an idle core
    return {"num_gaussians": k, "views": views, "detector": [detector, detector], "torch_threads":
            torch.get_num_threads(), "seconds_per_iteration": min(times), "cpu_seconds_per_iteration": min(cpu),
            "target_seconds": 0.5, "meets_target": min(times) <= 0.5, "meets_target_cpu": min(cpu) <= 0.5,
            "loadavg": list(os.getloadavg())}


# ------------------------------------------------------------------------ tables
def ratio_table(runs: dict, reference: str = "3dgr") -> dict:
    """Per init: iterations (and seconds) to reach the reference run's final PSNR, over the reference's own."""
    ref = runs.get(reference)
    if not ref or "history" not in ref:
        return {}
    target = ref["final_psnr"]
    ref_hit = first_reaching(ref["history"], target)
    table = {"reference": reference, "target_psnr": target, "paper_ratio": PAPER_RATIO, "rows": {}}
    for name, r in runs.items():
        if "history" not in r:
            continue
        hit = first_reaching(r["history"], target)
        row = {"iterations": hit["iteration"] if hit else None, "seconds": hit["seconds"] if hit else None}
        if hit and ref_hit and ref_hit["iteration"]:
            row["ratio_iterations"] = hit["iteration"] / ref_hit["iteration"]
            row["ratio_seconds"] = (hit["seconds"] / ref_hit["seconds"]) if ref_hit["seconds"] else None
        else:
            row["ratio_iterations"] = None
        for name2 in ("fdk", "fdk_plus2", "fdk_plus4"):
            a, b = r.get(f"iterations_to_{name2}"), ref.get(f"iterations_to_{name2}")
            row[f"ratio_to_{name2}"] = a / b if a is not None and b else None
        table["rows"][name] = row
    return table


def summarise_scan(scan: dict) -> None:
    """The ratio tables (against ``3dgr``, the target's reference, and ``fbp``, the stronger default) and the
    quality targets, from ``scan["runs"]``."""
    runs = scan["runs"]
    scan["ratios_to_3dgr"] = ratio_table(runs, "3dgr")
    scan["ratios_to_fbp"] = ratio_table(runs, "fbp")
    best = max((r["final_psnr"] for r in runs.values() if "final_psnr" in r), default=None)
    sart = scan["rtk"].get("sart", {}).get("best_psnr") if isinstance(scan.get("rtk"), dict) else None
    sirt = scan.get("sirt", {}).get("best_psnr")
    scan["targets"] = {"best_gaussian_psnr": best,
                       "best_over_fdk": None if best is None else best - scan["fdk_psnr"],
                       "quality_target_4db": None if best is None else best - scan["fdk_psnr"] >= 4.0,
                       "at_or_above_rtk_sart": None if best is None or sart is None else best >= sart,
                       "at_or_above_own_sirt": None if best is None or sirt is None else best >= sirt}


def merge_results(paths: list[Path]) -> dict:
    """One result from several runs of this script over different ``--inits`` (e.g. one process per core):
    scans are matched by volume and view count, their runs (and any baseline a part computed) joined, and the
    ratio tables and targets recomputed. The parts must share the scan settings; the first part's are kept."""
    import json

    parts = [json.loads(Path(p).read_text()) for p in paths]
    merged = dict(parts[0], merged_from=[str(p) for p in paths], inits=[], counts={}, checkpoint_by_init={},
                  wall_seconds=[p.get("wall_seconds") for p in parts],
                  loadavg=[[p.get("loadavg_start"), p.get("loadavg_end")] for p in parts])
    by_key: dict = {}
    for part in parts:
        merged["inits"] += [m for m in part["inits"] if m not in merged["inits"]]
        merged["counts"].update({m: part["counts"].get(m) for m in part["inits"]})
        merged["speed_check"] = merged.get("speed_check") or part.get("speed_check")
        merged["checkpoint_by_init"].update(
            {m: part.get("checkpoint") for m in part["inits"] if m.startswith("medgmae")})
        for scan in part["scans"]:
            key = (scan["volume"], scan["views"])
            if key not in by_key:
                by_key[key] = dict(scan, runs=dict(scan["runs"]))
                continue
            into = by_key[key]
            if into["fit_config"] != scan["fit_config"] or into["shape"] != scan["shape"]:
                raise ValueError(f"{key}: the parts were run with different settings; cannot merge")
            into["runs"].update(scan["runs"])
            for baseline in ("sirt", "rtk"):
                if "skipped" in into.get(baseline, {}) and "skipped" not in scan.get(baseline, {}):
                    into[baseline] = scan[baseline]
    merged["scans"] = list(by_key.values())
    for scan in merged["scans"]:
        summarise_scan(scan)
    return merged


def plot(path: Path, scans: list[dict]) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.2 * len(scans)))
    axes = fig.subplots(len(scans), 3, squeeze=False)
    for row, scan in zip(axes, scans):
        label = f"{scan['volume']}, {scan['views']} views"
        for name, r in scan["runs"].items():
            if "history" not in r:
                continue
            its = [h["iteration"] for h in r["history"]]
            row[0].plot(its, [h["psnr"] for h in r["history"]], label=name)
            row[1].plot([h["seconds"] for h in r["history"]], [h["psnr"] for h in r["history"]], label=name)
            if r["ssim_history"]:
                row[2].plot([s["iteration"] for s in r["ssim_history"]], [s["ssim"] for s in r["ssim_history"]],
                            label=name, marker=".")
        for ax, xl, yl in ((row[0], "iteration", "PSNR (dB)"), (row[1], "fit seconds", "PSNR (dB)"),
                           (row[2], "iteration", "SSIM")):
            ax.set_xlabel(xl)
            ax.set_ylabel(yl)
            ax.set_title(label, fontsize=9)
        for ax in row[:2]:
            ax.axhline(scan["fdk_psnr"], color="k", ls="--", lw=0.8, label="FDK")
            rtk = scan.get("rtk", {})
            if "sart" in rtk:
                ax.axhline(rtk["sart"]["best_psnr"], color="grey", ls=":", lw=0.8, label="RTK SART (best)")
            if "best_psnr" in scan.get("sirt", {}):
                ax.axhline(scan["sirt"]["best_psnr"], color="tab:brown", ls="-.", lw=0.8, label="SIRT, ours (best)")
        row[2].axhline(scan["fdk_ssim"], color="k", ls="--", lw=0.8)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


# -------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="48^3 at 3 mm, 40 views, 150 iterations (21 min on one thread at load ~6)")
    ap.add_argument("--volumes", default="chest_cta,phantom")
    ap.add_argument("--views", default="120,40")
    ap.add_argument("--inits", default=",".join(ALL_INITS))
    ap.add_argument("--iters", type=int, default=1500)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--views-per-iter", type=int, default=10)
    ap.add_argument("--lr-horizon", type=int, default=FitConfig.lr_horizon)
    ap.add_argument("--lr-intensity", type=float, default=FitConfig.lr_intensity)
    ap.add_argument("--grad-threshold", type=float, default=FitConfig.grad_threshold)
    ap.add_argument("--densify-fraction", type=float, default=FitConfig.densify_fraction)
    ap.add_argument("--num-gaussians", type=int, default=None,
                    help="initial count of every init (default 20000, --quick 3000; zero-shot: predicted + residual; "
                         "3dgr keeps 3DGR-CT's 50k unless given or --quick)")
    ap.add_argument("--residual-fit-iters", type=int, default=100)
    ap.add_argument("--oracle-gaussians", type=int, default=512, help="the oracle's predicted set (a model's k)")
    ap.add_argument("--oracle-iters", type=int, default=600)
    ap.add_argument("--sart-iters", type=int, default=20)
    ap.add_argument("--sirt-iters", type=int, default=100)
    ap.add_argument("--checkpoint", default=None, help="MedGMAE(*) checkpoint (default: newest weights/*.pt)")
    ap.add_argument("--threads", type=int, default=1, help="torch/numba threads (one by default: shared machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-speed-check", action="store_true")
    ap.add_argument("--speed-only", action="store_true", help="only the speed check, written to --out")
    ap.add_argument("--merge", nargs="+", type=Path, default=None,
                    help="join the JSON of runs over different --inits into --out (no fitting)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.merge:
        merged = merge_results(args.merge)
        write_json(Path(args.out), merged)
        plot(Path(args.out).with_suffix(".png"), merged["scans"])
        print(f"merged {len(args.merge)} parts into {args.out}")
        return 0
    if args.speed_only:
        write_json(Path(args.out), {"benchmark": "recon_init speed check", "threads": args.threads,
                                    "speed_check": speed_check()})
        return 0
    downsample = 1
    count = args.num_gaussians or 20000  # every init's initial count; the zero-shot residual takes what is left
    counts = {**{m: count for m in ALL_INITS}, "3dgr": args.num_gaussians}  # 3dgr: its own 50k unless given
    if args.quick:
        downsample, args.views, args.iters, args.eval_every = 2, "40", min(args.iters, 150), 25
        counts = {m: args.num_gaussians or 3000 for m in ALL_INITS}
        # SIRT costs two voxel projections per pass (~15 s at 48^3, 40 views on a loaded machine): few passes
        args.oracle_gaussians, args.oracle_iters = 512, 300
        args.sart_iters, args.sirt_iters = min(args.sart_iters, 10), min(args.sirt_iters, 12)
        args.residual_fit_iters = min(args.residual_fit_iters, 60)
    inits = [m.strip() for m in args.inits.split(",") if m.strip()]
    checkpoint = Path(args.checkpoint) if args.checkpoint else bundled_weights()
    ck_info: dict = {"path": str(checkpoint) if checkpoint else None}
    training = None
    if checkpoint is not None:
        from medgmae_core.train.checkpoint import load_checkpoint

        ck = load_checkpoint(checkpoint)
        training = training_inputs(ck)
        ck_info.update(step=ck.get("step"), model=(ck.get("model_config") or {}).get("name"),
                       objective=(ck.get("model_config") or {}).get("objective"), training_inputs=training)
    t_start = time.perf_counter()
    load_start = list(os.getloadavg())
    scans = []
    for vname in [v.strip() for v in args.volumes.split(",") if v.strip()]:
        mu, spacing, source = load_volume(vname, downsample)
        hold = held_out(source, training, phantom_seed=PHANTOM_SEED if vname == "phantom" else None)
        for views in [int(v) for v in str(args.views).split(",")]:
            data = simulate_scan(mu, spacing, geometry="cone", views=views, source=source)
            rng = float(mu.max() - mu.min())
            t0 = time.perf_counter()
            fdk = analytic_reconstruction(data)
            scan = {"volume": vname, "source": source, "held_out": hold, "shape": list(mu.shape),
                    "spacing_mm": list(spacing), "views": views, "detector": list(data.geometry.detector_shape),
                    "psnr_data_range": rng, "fdk_seconds": time.perf_counter() - t0,
                    "fdk_psnr": psnr(fdk, mu, rng), "fdk_ssim": ssim(fdk, mu, rng)}
            print(f"{vname} {views} views: {tuple(mu.shape)}, FDK {scan['fdk_psnr']:.2f} dB", flush=True)
            scan["rtk"] = rtk_runs(data, rng, args.sart_iters)
            print(f"  RTK: { {k: v.get('psnr') for k, v in scan['rtk'].items() if isinstance(v, dict)} }", flush=True)
            if args.sirt_iters > 0:
                scan["sirt"] = sirt_run(data, rng, args.sirt_iters)
                print(f"  SIRT (ours): {scan['sirt']['psnr']:.2f} dB (best {scan['sirt']['best_psnr']:.2f})",
                      flush=True)
            else:
                scan["sirt"] = {"skipped": "--sirt-iters 0"}
            cfg = FitConfig(iters=args.iters, eval_every=args.eval_every, views_per_iter=args.views_per_iter,
                            lr_horizon=args.lr_horizon, lr_intensity=args.lr_intensity, grad_threshold=args.grad_threshold,
                            densify_fraction=args.densify_fraction, seed=args.seed)
            scan["fit_config"] = cfg.to_dict()
            max_intensity = default_max_intensity(fdk)
            runs: dict = {}
            for method in inits:
                prediction = None
                if method.startswith("medgmae") and checkpoint is None:
                    runs[method] = {"method": method, "skipped": "no checkpoint (--checkpoint or weights/*.pt)"}
                    continue
                extra = {}
                if method == "oracle":
                    prediction, extra = oracle_prediction(mu, data.geometry.volume_extent_mm, args.oracle_gaussians,
                                                          args.oracle_iters, args.seed)
                print(f"  {method}:", flush=True)
                try:
                    runs[method] = fit_run(method, data, fdk, cfg,
                                           num_gaussians=counts[method], checkpoint=checkpoint,
                                           prediction=prediction, max_intensity=max_intensity,
                                           residual_fit_iters=args.residual_fit_iters, seed=args.seed,
                                           fdk_psnr=scan["fdk_psnr"], rng=rng)
                    runs[method].update(extra)
                    if method.startswith("medgmae"):
                        runs[method]["checkpoint_held_out"] = hold
                except (ValueError, FileNotFoundError) as exc:
                    runs[method] = {"method": method, "failed": f"{type(exc).__name__}: {exc}"}
            scan["runs"] = runs
            summarise_scan(scan)
            scans.append(scan)
    speed = None if args.no_speed_check else speed_check()
    out = Path(args.out)
    payload = {"benchmark": "recon_init", "quick": args.quick, "checkpoint": ck_info,
               "threads": args.threads, "loadavg_start": load_start, "loadavg_end": list(os.getloadavg()),
               "wall_seconds": time.perf_counter() - t_start, "iters": args.iters, "inits": inits,
               "counts": counts, "oracle": {"gaussians": args.oracle_gaussians,
                                                                     "iters": args.oracle_iters},
               "speed_check": speed, "scans": scans}
    write_json(out, payload)
    plot(out.with_suffix(".png"), scans)
    print(f"wrote {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
