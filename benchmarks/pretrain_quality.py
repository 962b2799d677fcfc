"""Pre-training quality on held-out windows: does the Gaussian prior learn anatomy?

    python benchmarks/pretrain_quality.py --gaussian CKPT [--voxel CKPT] --out FILE.json [--png FILE.png]

Windows: 96^3 at 1.5 mm from real CTs the checkpoints never saw (default: the shipped chest CTA; every
``--ct`` is checked against the training list recorded in each checkpoint) and generated phantoms with seeds
the training never uses (``evaluation.HELDOUT_PHANTOM_SEED`` on). Each window gets one fixed 75% mask
(identical for every model). Reported per model and per window set:

* masked-region PSNR (data range 1 on the HU window [-175, 250] -> [0, 1]) and two non-learned baselines: the
  constant (the mean of the visible voxels) and the interpolation (a normalised convolution of the visible
  voxels, sigma 3 voxels: ``evaluation.interpolate_visible``), and the model's gain over each;
* for Gaussian checkpoints the median largest sigma in voxels, and the full-window PSNR of each inference
  mask policy (``none``, ``single``, ``average``, ``hidden``);
* the direct-fit bound: Gaussians fitted straight to each window with the renderer (``volume_fit``, same k,
  fixed count), scored on the same masked region; and the same fit to the interpolation of the visible voxels
  (``interpolation_fit``): whether k Gaussians can express the non-learned baseline at all;
* on phantoms, the Dice of the thresholded prediction against the organ labels in the masked region;
* for a checkpoint with the intensity prior, the same scores of that prior alone (``prior_only``: the
  untrained model with its intensity correction zeroed, so every Gaussian sits on its anchor at the initial
  scale with the local level of the visible patches). What the training adds is the difference.

The PNG shows a few windows: input, masked input, Gaussian prediction (voxel-MAE prediction when given),
Gaussian outlines.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402

from medgmae_core.model.medgmae import MASK_POLICIES  # noqa: E402
from medgmae_core.train import evaluation as ev  # noqa: E402
from medgmae_core.train.checkpoint import load_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CT = REPO / ".." / "shared" / "data" / "ct" / "totalsegmentator" / "chest_cta_pulmonary_ct_cropped.nii.gz"


def training_list(path: str) -> list[str] | None:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return (ckpt.get("extra") or {}).get("training_data") or ckpt.get("training_data")


def check_held_out(ct_paths: list[Path], checkpoints: dict[str, str]) -> dict:
    """Per checkpoint: 'held out' when no evaluation CT is in its training list, else the overlap."""
    out = {}
    for label, path in checkpoints.items():
        seen = training_list(path)
        if seen is None:
            out[label] = "unknown (the checkpoint records no training list)"
            continue
        resolved = {str(Path(s).resolve()) for s in seen}
        overlap = [str(p) for p in ct_paths if str(p.resolve()) in resolved]
        if overlap:
            raise SystemExit(f"{path} was trained on {overlap}: not held out; choose other --ct files")
        out[label] = f"held out ({len(seen)} training inputs recorded)"
    return out


def prior_only_model(config, seed: int):
    """The untrained model of ``config`` with its intensity correction zeroed: the intensity prior alone."""
    from medgmae_core.model import build_model

    torch.manual_seed(seed)
    model = build_model(config).eval()
    model.decoder.heads.head_intensity.weight.data.zero_()
    return model


def masked_fit_bound(windows, model, iters: int, seed: int, target: str = "window") -> dict:
    """Gaussians (the model's k) fitted straight to each window (``target="window"``: the direct-fit bound, which
    sees the hidden voxels) or to the interpolation of its visible voxels (``"interpolation"``: what k Gaussians
    keep of the non-learned baseline), scored on the masked region the model was scored on."""
    from medgmae_core.render import render_volume
    from medgmae_core.volume_fit import fit_volume

    sigma = ev.INTERPOLATION_SIGMA_RATIO * float(np.mean(model.config.patch_size))
    values, consts, sigmas = [], [], []
    for i, w in enumerate(windows):
        mask = ev.window_mask(model, i + seed)  # the mask the model was scored on
        t = w.volume
        goal = t if target == "window" else ev.interpolate_visible(t[None, None], ~mask[None, None], sigma)[0, 0]
        fit = fit_volume(goal, model.config.num_gaussians, iters=iters)
        pred = render_volume(fit.gaussians, tuple(t.shape))[0]
        values.append(ev.psnr(float(((pred - t)[mask] ** 2).mean())))
        consts.append(ev.psnr(float(((t[~mask].mean() - t)[mask] ** 2).mean())))
        sigmas.append(ev.largest_sigma_voxels(fit.gaussians, t.shape))
    return dict(target=target, psnr=float(np.mean(values)), psnr_constant=float(np.mean(consts)),
                median_largest_sigma_vox=float(torch.cat(sigmas).median()), iters=iters,
                num_gaussians=model.config.num_gaussians)


def write_png(path: Path, windows, gaussian_model, voxel_model, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.collections import EllipseCollection

    from medgmae_core.export.figures import slice_ellipses, voxel_gaussians

    cols = 4 + (voxel_model is not None)
    fig, axes = plt.subplots(len(windows), cols, figsize=(3 * cols, 3 * len(windows)), squeeze=False)
    for row, (i, w) in enumerate(windows):
        x = w.volume[None, None].float()
        noise = ev.window_noise(gaussian_model.num_patches, seed + i)[None]
        with torch.no_grad():
            gaussian_model.eval()
            latent, mask, ids = gaussian_model.forward_encoder(x, None, None, noise)
            g = gaussian_model.forward_decoder(latent, ids, gaussian_model.intensity_prior_input(x))[-1]
            pred = gaussian_model.render(g)[0, 0]
            mvol = gaussian_model.mask_volume(mask)[0, 0]
            panels = [("input", w.volume), ("masked input", w.volume * (1 - mvol)), ("MedGMAE", pred)]
            if voxel_model is not None:
                voxel_model.eval()
                lat, _, ids_v = voxel_model.forward_encoder(x, None, None, noise)
                panels.append(("voxel MAE", voxel_model.unpatchify(voxel_model.forward_decoder(lat, ids_v))[0, 0]))
            panels.append(("Gaussians (2 sigma)", pred))
        z = w.volume.shape[2] // 2
        for c, (title, img) in enumerate(panels):
            ax = axes[row, c]
            ax.imshow(img[:, :, z].clamp(0, 1).T.numpy(), cmap="gray", vmin=0, vmax=1, origin="lower")
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
            if c == 0:
                ax.set_ylabel(Path(w.name.split("@")[0]).name[:24] + "\n" + w.name.split("@")[-1], fontsize=7)
        centres, cov, inten = voxel_gaussians(g[0:1], w.volume.shape)
        _, xy, widths, heights, angles = slice_ellipses(centres, cov, axis=2, index=z)
        if len(xy):
            coll = EllipseCollection(widths, heights, angles, units="xy", offsets=xy, offset_transform=axes[row, -1].transData,
                                     facecolors="none", edgecolors="tab:orange", linewidths=0.6)
            axes[row, -1].add_collection(coll)
        n0, n1 = w.volume.shape[0], w.volume.shape[1]
        axes[row, -1].set_xlim(-0.5, n0 - 0.5), axes[row, -1].set_ylim(-0.5, n1 - 0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gaussian", required=True, help="MedGMAE checkpoint")
    parser.add_argument("--voxel", default=None, help="voxel-MAE checkpoint trained for the same steps")
    parser.add_argument("--ct", nargs="*", default=[str(DEFAULT_CT)], help="held-out real CTs")
    parser.add_argument("--ct-windows", type=int, default=4, help="windows per CT (centre, then corners)")
    parser.add_argument("--phantoms", type=int, default=4, help="held-out phantom windows")
    parser.add_argument("--fit-iters", type=int, default=600, help="iterations of the direct-fit bound (0: skip)")
    parser.add_argument("--fit-windows", type=int, default=4, help="windows per set for the direct-fit bound")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--png", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()

    checkpoints = {"gaussian": args.gaussian, **({"voxel": args.voxel} if args.voxel else {})}
    ct_paths = [Path(p) for p in args.ct]
    held_out = check_held_out(ct_paths, checkpoints)
    sets = {"real_ct": [w for p in ct_paths for w in ev.ct_windows(p, args.ct_windows)],
            "phantom": ev.phantom_windows(args.phantoms)}
    result = {"held_out": held_out, "windows": {k: [w.name for w in v] for k, v in sets.items()},
              "load_before": os.getloadavg(), "threads": args.threads, "models": {}}
    models = {}
    for label, path in checkpoints.items():
        model, config = load_model(path)
        models[label] = model
        step = torch.load(path, map_location="cpu", weights_only=False).get("step")
        entry = {"checkpoint": str(path), "step": step, "config": config.to_dict()}
        for name, windows in sets.items():
            r = ev.evaluate_masked(model, windows, seed=args.seed)
            if config.is_gaussian:
                r["mask_policies_full_window_psnr"] = {
                    p: v["psnr"] for p, v in ev.evaluate_mask_policies(model, windows, MASK_POLICIES, seed=args.seed).items()}
            entry[name] = r
        result["models"][label] = entry
        shown = ("psnr", "psnr_constant", "psnr_interpolation")
        print(label, {n: {k: round(entry[n][k], 3) for k in shown} for n in sets}, flush=True)
    if models["gaussian"].config.intensity_prior_radius > 0:
        prior = prior_only_model(models["gaussian"].config, args.seed)
        result["prior_only"] = {name: ev.evaluate_masked(prior, windows, seed=args.seed) for name, windows in sets.items()}
        print("prior only", {n: round(r["gain_db"], 3) for n, r in result["prior_only"].items()}, flush=True)
    if args.fit_iters > 0:
        result["direct_fit"] = {name: masked_fit_bound(w[:args.fit_windows], models["gaussian"], args.fit_iters, args.seed)
                                for name, w in sets.items()}
        print("direct fit", result["direct_fit"], flush=True)
        result["interpolation_fit"] = {
            name: masked_fit_bound(w[:args.fit_windows], models["gaussian"], args.fit_iters, args.seed, "interpolation")
            for name, w in sets.items()}
        print("Gaussians fitted to the interpolation", result["interpolation_fit"], flush=True)
    g = result["models"]["gaussian"]
    result["targets"] = {
        "gain_over_constant_db_real_ct": g["real_ct"]["gain_db"],
        "gain_over_constant_at_least_3db": g["real_ct"]["gain_db"] >= 3.0,
        "gain_over_interpolation_db_real_ct": g["real_ct"]["gain_over_interpolation_db"],
        "gain_over_interpolation_db_phantom": g["phantom"]["gain_over_interpolation_db"],
        "median_largest_sigma_vox": g["real_ct"].get("median_largest_sigma_vox"),
        "median_sigma_at_most_8": (g["real_ct"].get("median_largest_sigma_vox") or 1e9) <= 8.0,
    }
    if "direct_fit" in result:
        gap = result["direct_fit"]["real_ct"]["psnr"] - g["real_ct"]["psnr"]
        result["targets"].update(gap_to_direct_fit_db_real_ct=gap, within_3db_of_direct_fit=gap <= 3.0,
                                 interpolation_gap_to_direct_fit_db_real_ct=(
                                     result["direct_fit"]["real_ct"]["psnr"] - g["real_ct"]["psnr_interpolation"]))
    if "prior_only" in result:
        result["targets"]["gain_over_prior_only_db_real_ct"] = g["real_ct"]["psnr"] - result["prior_only"]["real_ct"]["psnr"]
        result["targets"]["gain_over_prior_only_db_phantom"] = g["phantom"]["psnr"] - result["prior_only"]["phantom"]["psnr"]
    if "voxel" in result["models"]:
        result["targets"]["gaussian_minus_voxel_masked_psnr_db_real_ct"] = (
            g["real_ct"]["psnr"] - result["models"]["voxel"]["real_ct"]["psnr"])
    result["seconds"] = time.time() - t_start
    result["load_after"] = os.getloadavg()
    write_json(args.out, result)
    if args.png:
        shown = [(0, sets["real_ct"][0]), (1, sets["real_ct"][1 % len(sets["real_ct"])]), (0, sets["phantom"][0])]
        write_png(Path(args.png), shown, models["gaussian"], models.get("voxel"), args.seed)
    print("targets", result["targets"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
