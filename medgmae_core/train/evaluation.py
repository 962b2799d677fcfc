"""Held-out evaluation of a pre-trained model: masked-region PSNR against two non-learned baselines, Gaussian
sizes, phantom Dice, and full-window PSNR per inference mask policy.

The baselines fill the masked voxels from the visible ones without learning anything: the *constant* (the mean
of the visible voxels) and the *interpolation* (normalised convolution, :func:`interpolate_visible`, with a
Gaussian of ``INTERPOLATION_SIGMA_RATIO`` patch sizes: 3 voxels for 12^3 patches, the best of 1.5 / 2 / 3 / 4
voxels on held-out phantoms). A model that does not beat the interpolation has learnt nothing a blur cannot do.

Windows are 96^3 (the model's ``img_size``) crops of CTs prepared like the training data (RAS, 1.5 mm,
HU window [-175, 250] -> [0, 1]) or of generated phantoms with seeds the training never used. Masks come
from a fixed seed per window, so two checkpoints are compared on identical inputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..data.phantom import LABEL_IDS, make_phantom
from ..data.transforms import window_hu
from ..data.volumes import read_volume
from ..gaussians import GaussianSet
from ..inference import extract_window, prepare_ct
from ..model.interpolation import interpolate_visible

HELDOUT_PHANTOM_SEED = 1000  # training uses phantom seeds 0..N-1; held-out phantoms start here
BODY_THRESHOLD = 0.1  # windowed value ~ -132 HU: between air/lung and fat
ORGAN_THRESHOLD = 0.58  # ~ 71 HU: between muscle (45 HU) and enhancing organs (liver 100 HU and up)
INTERPOLATION_SIGMA_RATIO = 0.25  # of the patch size
ORGAN_LABELS = ("liver", "spleen", "kidney_cortex", "kidney_medulla", "aorta", "ivc")


@dataclass
class EvalWindow:
    """One held-out window: ``volume [D, H, W]`` windowed to [0, 1]; phantom ``labels [D, H, W]`` or None."""

    name: str
    volume: torch.Tensor
    labels: np.ndarray | None = None


def psnr(mse: float, data_range: float = 1.0) -> float:
    return 10.0 * math.log10(data_range ** 2 / max(mse, 1e-12))


def window_offsets(shape: Sequence[int], window: int, count: int) -> list[tuple[int, int, int]]:
    """Up to ``count`` window offsets: the volume's centre, then its corners (clamped inside the volume)."""
    hi = [max(0, n - window) for n in shape]
    corners = [tuple(h * b for h, b in zip(hi, (i >> 2 & 1, i >> 1 & 1, i & 1))) for i in range(8)]
    centre = tuple(h // 2 for h in hi)
    out: list[tuple[int, int, int]] = []
    for o in [centre] + corners:
        if o not in out:
            out.append(o)
    return out[:count]


def ct_windows(path, count: int = 4, window: int = 96, spacing_mm: float = 1.5) -> list[EvalWindow]:
    """``count`` windows of a CT file, prepared as for training (smaller axes are zero-padded, centred)."""
    vol = read_volume(path)
    prepared = prepare_ct(vol.array, vol.affine, spacing_mm=spacing_mm)
    shape = prepared.shape
    out = []
    for o in window_offsets(shape, window, count):
        offset = tuple(oi if n >= window else -((window - n) // 2) for oi, n in zip(o, shape))
        out.append(EvalWindow(f"{path}@{offset}", extract_window(prepared.volume, offset, (window,) * 3)))
    return out


def phantom_windows(count: int = 4, seed: int = HELDOUT_PHANTOM_SEED, shape=(128, 128, 96),
                    window: int = 96) -> list[EvalWindow]:
    """One window per phantom (seeds ``seed, seed + 1, ...``), at a corner chosen by the seed."""
    out = []
    for i in range(count):
        ph = make_phantom(tuple(shape), spacing_mm=1.5, seed=seed + i)
        vol = torch.from_numpy(window_hu(ph.hu.astype(np.float32)))
        offsets = window_offsets(vol.shape, window, 9)
        o = offsets[i % len(offsets)]
        labels = extract_window(torch.from_numpy(ph.labels.astype(np.int64)), o, (window,) * 3).numpy()
        out.append(EvalWindow(f"phantom_{seed + i:04d}@{o}", extract_window(vol, o, (window,) * 3), labels))
    return out


def window_noise(num_patches: int, seed: int) -> torch.Tensor:
    """``[L]`` masking noise of held-out window ``seed`` (``random_masking`` keeps the lowest values)."""
    return torch.rand(num_patches, generator=torch.Generator().manual_seed(seed))


def window_mask(model, seed: int, mask_ratio: float | None = None) -> torch.Tensor:
    """The voxel mask ``[D, H, W]`` (True = hidden) that :func:`evaluate_masked` gives window ``seed``."""
    noise = window_noise(model.num_patches, seed)[None]
    ratio = model.resolve_mask_ratio(mask_ratio)
    keep = model.num_patches - int(round(model.num_patches * ratio))
    hidden = torch.ones(1, model.num_patches)
    hidden[0, torch.argsort(noise[0])[:keep]] = 0
    return model.mask_volume(hidden)[0, 0].bool()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else float("nan")


def largest_sigma_voxels(gaussians: GaussianSet, shape: Sequence[int]) -> torch.Tensor:
    """Each Gaussian's largest standard deviation in voxels ``[B * k]`` (normalised scale times N - 1)."""
    extent = torch.tensor([n - 1 for n in shape], dtype=torch.float32)
    return (gaussians.scales.detach().float().cpu() * extent).amax(-1).reshape(-1)


@torch.no_grad()
def evaluate_masked(model, windows: Sequence[EvalWindow], *, mask_ratio: float | None = None, seed: int = 0,
                    batch_size: int = 2) -> dict:
    """Masked-region reconstruction on held-out windows, each with a fixed mask (seed ``seed + i``).

    Per window: masked-voxel MSE of the prediction and of the two baselines (the constant: the mean of the
    visible voxels; the interpolation: :func:`interpolate_visible`), their PSNRs (data range 1), and for Gaussian
    models the median largest sigma in voxels; for phantoms the Dice of the thresholded prediction against the
    organ labels inside the masked region. ``gain_db`` is over the constant, ``gain_over_interpolation_db`` over
    the interpolation.
    """
    was_training = model.training
    model.eval()
    rows, sigmas = [], []
    try:
        for start in range(0, len(windows), batch_size):
            chunk = windows[start:start + batch_size]
            x = torch.stack([w.volume for w in chunk])[:, None].float()  # [b, 1, D, H, W]
            noise = torch.stack([window_noise(model.num_patches, seed + start + j) for j in range(len(chunk))])  # [b, L]
            ratio = model.resolve_mask_ratio(mask_ratio)
            latent, mask, ids_restore = model.forward_encoder(x, ratio, None, noise)
            if model.config.is_gaussian:
                sets = model.forward_decoder(latent, ids_restore, model.intensity_prior_input(x))
                pred = model.render(sets[-1])
                sigmas.append(largest_sigma_voxels(sets[-1], model.config.img_size))
            else:
                pred = model.unpatchify(model.forward_decoder(latent, ids_restore))
            mask_vol = model.mask_volume(mask).bool()  # [b, 1, D, H, W]
            sigma = INTERPOLATION_SIGMA_RATIO * float(np.mean(model.config.patch_size))
            interpolated = interpolate_visible(x, ~mask_vol, sigma)  # [b, 1, D, H, W]
            for j, w in enumerate(chunk):
                m, t, p = mask_vol[j, 0], x[j, 0], pred[j, 0].float()
                constant = t[~m].mean() if (~m).any() else t.mean()
                mse = float(((p - t)[m] ** 2).mean())
                mse_const = float(((constant - t)[m] ** 2).mean())
                mse_interp = float(((interpolated[j, 0] - t)[m] ** 2).mean())
                row = dict(name=w.name, mse=mse, mse_constant=mse_const, mse_interpolation=mse_interp, psnr=psnr(mse),
                           psnr_constant=psnr(mse_const), psnr_interpolation=psnr(mse_interp))
                if w.labels is not None:
                    labels, mm = w.labels, m.numpy()
                    organs = np.isin(labels, [LABEL_IDS[n] for n in ORGAN_LABELS if n in LABEL_IDS])
                    pn, tn = p.numpy(), t.numpy()
                    row["dice_body"] = dice((pn > BODY_THRESHOLD) & mm, (labels > 0) & mm)
                    row["dice_organs"] = dice((pn > ORGAN_THRESHOLD) & mm, organs & mm)
                    row["dice_organs_of_input"] = dice((tn > ORGAN_THRESHOLD) & mm, organs & mm)
                rows.append(row)
    finally:
        model.train(was_training)
    summary = dict(
        windows=len(rows),
        psnr=float(np.mean([r["psnr"] for r in rows])),
        psnr_constant=float(np.mean([r["psnr_constant"] for r in rows])),
        psnr_interpolation=float(np.mean([r["psnr_interpolation"] for r in rows])),
    )
    summary["gain_db"] = summary["psnr"] - summary["psnr_constant"]
    summary["gain_over_interpolation_db"] = summary["psnr"] - summary["psnr_interpolation"]
    if sigmas:
        summary["median_largest_sigma_vox"] = float(torch.cat(sigmas).median())
    for key in ("dice_body", "dice_organs", "dice_organs_of_input"):
        vals = [r[key] for r in rows if key in r and not math.isnan(r[key])]
        if vals:
            summary[key] = float(np.mean(vals))
    summary["per_window"] = rows
    return summary


@torch.no_grad()
def evaluate_mask_policies(model, windows: Sequence[EvalWindow], policies: Sequence[str], *, seed: int = 0) -> dict:
    """Full-window PSNR of the rendered prediction for each inference mask policy (``model.predict_gaussians``)."""
    out = {}
    for policy in policies:
        values = []
        for i, w in enumerate(windows):
            x = w.volume[None, None].float()
            g = model.predict_gaussians(x, mask_policy=policy, generator=torch.Generator().manual_seed(seed + i))
            pred = model.render(g)[0, 0]
            values.append(psnr(float(((pred - w.volume) ** 2).mean())))
        out[policy] = dict(psnr=float(np.mean(values)), per_window=values,
                           gaussians=int(g.num_gaussians))
    return out
