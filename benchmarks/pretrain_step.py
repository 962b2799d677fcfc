"""Pre-training step benchmark: where a step's time goes, MedGMAE against the voxel-MAE baseline.

    python benchmarks/pretrain_step.py --out pretrain_step.json [--model tiny] [--batch 2] [--size 96]
                                       [--objectives gaussian voxel] [--repeats 3]

For each objective one optimiser step on phantom crops is split into
encoder, decoder, render (forward), loss, backward and optimiser, timed by
hand with the model's stage methods (``forward_encoder``, ``forward_decoder``,
``render``, ``forward_loss``). The renderer's own backward is timed separately
(the decoder's Gaussians as leaves, render + loss + backward) so that

    render_share = (render forward + render backward) / step

(target <= 0.25 on CPU). The fastest of ``--repeats`` steps after one warm-up
step (the machine is shared; ratios within one run are what count); peak extra
memory over the timed steps.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakMemory, write_json  # noqa: E402

from medgmae_core.data.phantom import make_phantom  # noqa: E402
from medgmae_core.data.transforms import window_hu  # noqa: E402
from medgmae_core.gaussians import GaussianSet  # noqa: E402
from medgmae_core.model import build_model, get_config  # noqa: E402
from medgmae_core.render import resolve_backend  # noqa: E402
from medgmae_core.train.optim import build_optimizer, clip_gradients  # noqa: E402

RENDER_SHARE_TARGET = 0.25


def phantom_batch(batch: int, size: int) -> torch.Tensor:
    """``[B, 1, S, S, S]`` windowed phantom crops (one phantom seed per sample)."""
    crops = []
    for seed in range(batch):
        ph = make_phantom((int(size * 4 / 3), int(size * 4 / 3), size), seed=seed)
        x0 = (ph.hu.shape[0] - size) // 2
        crops.append(window_hu(ph.hu[x0:x0 + size, x0:x0 + size, :size]))
    return torch.from_numpy(np.stack(crops)[:, None]).float()


class Timer:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Block:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.times[name] = timer.times.get(name, 0.0) + time.perf_counter() - self.t0

        return _Block()


def timed_step(model, optimizer, imgs: torch.Tensor, step: int) -> dict[str, float]:
    """One training step, stage by stage (mirrors ``MedGMAE.forward`` / ``VoxelMAE.forward``)."""
    t = Timer()
    generator = torch.Generator().manual_seed(step)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    with t("encoder"):
        latent, mask, ids_restore = model.forward_encoder(imgs, None, generator)
    with t("decoder"):
        out = (model.forward_decoder(latent, ids_restore, model.intensity_prior_input(imgs)) if model.config.is_gaussian
               else model.forward_decoder(latent, ids_restore))
    if model.config.is_gaussian:
        with t("render"):
            preds = [model.render(g) for g in out]
        with t("loss"):
            loss = torch.stack([model.forward_loss(imgs, p, mask) for p in preds]).mean()
    else:
        t.times["render"] = 0.0
        with t("loss"):
            loss = model.forward_loss(imgs, out, mask)
    with t("backward"):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    with t("optimizer"):
        clip_gradients(model.parameters(), 1.0)
        optimizer.step()
    t.times["step"] = time.perf_counter() - t_start
    t.times["step_cpu"] = time.process_time() - cpu_start
    t.times["loss_value"] = float(loss.detach())
    if model.config.is_gaussian:
        t.times["render_backward"] = render_backward_time(model, out, imgs, mask)
    else:
        t.times["render_backward"] = 0.0
    return t.times


def render_backward_time(model, sets: list[GaussianSet], imgs: torch.Tensor, mask: torch.Tensor) -> float:
    """Backward of render + loss alone, with the decoder's Gaussians as leaves."""
    leaves = [g.detach().map(lambda x: x.clone().requires_grad_(True)) for g in sets]
    loss = torch.stack([model.forward_loss(imgs, model.render(g), mask) for g in leaves]).mean()
    t0 = time.perf_counter()
    loss.backward()
    return time.perf_counter() - t0


def bench_objective(objective: str, args, imgs: torch.Tensor) -> dict:
    torch.manual_seed(0)
    config = get_config(args.model, img_size=args.size, objective=objective)
    model = build_model(config).train()
    optimizer = build_optimizer(model, lr=1e-4)
    timed_step(model, optimizer, imgs, step=0)  # warm-up: allocations, numba compilation
    with PeakMemory() as peak:
        runs = [timed_step(model, optimizer, imgs, step=i + 1) for i in range(args.repeats)]
    best = min(runs, key=lambda r: r["step"])  # the least disturbed step; its split adds up to it
    render_total = best["render"] + best["render_backward"]
    record = {
        "objective": objective,
        "num_gaussians": config.num_gaussians if config.is_gaussian else None,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "step_s": best["step"],
        "split_s": {k: best[k] for k in ("encoder", "decoder", "render", "loss", "backward", "optimizer")},
        "render_backward_s": best["render_backward"],
        "render_share": render_total / best["step"] if best["step"] else 0.0,
        "samples_per_s": args.batch / best["step"],
        "step_cpu_s": best["step_cpu"],
        "peak_extra_mb": peak.peak_extra_mb,
        "loss": best["loss_value"],
        "step_s_all": [r["step"] for r in runs],
        "step_s_median": statistics.median(r["step"] for r in runs),
    }
    if config.is_gaussian:
        with torch.no_grad():
            latent, _, ids_restore = model.forward_encoder(imgs[:1], None)
            g = model.forward_decoder(latent, ids_restore, model.intensity_prior_input(imgs[:1]))[-1]
        record["render_backend"] = resolve_backend(g, config.render_backend)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--objectives", nargs="+", default=["gaussian", "voxel"],
                        choices=["gaussian", "gaussian_star", "voxel"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    imgs = phantom_batch(args.batch, args.size)
    results = {}
    for objective in args.objectives:
        results[objective] = bench_objective(objective, args, imgs)
        r = results[objective]
        split = ", ".join(f"{k} {v:.3f}" for k, v in r["split_s"].items())
        print(f"{objective:>13}: step {r['step_s']:.3f} s ({split}; render backward {r['render_backward_s']:.3f}) "
              f"render share {100 * r['render_share']:.1f}%  peak +{r['peak_extra_mb']:.0f} MB")
    payload = {
        "benchmark": "pretrain_step",
        "model": args.model, "batch": args.batch, "shape": [args.size] * 3, "repeats": args.repeats,
        "note": "fastest of the repeats (its split adds up to step_s); split_s are forward stages plus the whole "
                "backward and the optimiser step; the renderer's own backward (render_backward_s, measured "
                "separately) is part of split_s.backward; step_cpu_s is process CPU time (all threads)",
        "loadavg_1min": os.getloadavg()[0],
        "results": results,
        "targets": {"render_share_max": RENDER_SHARE_TARGET},
    }
    if "gaussian" in results and "voxel" in results:
        g, v = results["gaussian"], results["voxel"]
        payload["gaussian_vs_voxel"] = {"step_time_ratio": g["step_s"] / v["step_s"],
                                        "peak_memory_ratio": g["peak_extra_mb"] / max(v["peak_extra_mb"], 1e-9)}
    if "gaussian" in results:
        payload["targets"]["render_share_met"] = results["gaussian"]["render_share"] <= RENDER_SHARE_TARGET
    write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
