"""The tiny model learns on one real CT crop: 100 AdamW steps drop the loss clearly, for the
Gaussian and the voxel objective (48^3 crop at 1.5 mm, patch 12, HU window [-175, 250])."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medgmae_core.train.optim import param_groups
import torch.nn.functional as F

from medgmae_core.model import build_model, get_config

HU_WINDOW = (-175.0, 250.0)
SIZE = 48


@pytest.fixture(scope="module")
def ct_crop(small_real_ct) -> torch.Tensor:
    """``[1, 1, 48, 48, 48]`` in [0, 1]: the 3 mm example CT windowed, resampled to 1.5 mm, centre crop."""
    nib = pytest.importorskip("nibabel")
    hu = nib.load(str(small_real_ct)).get_fdata(dtype=np.float32)
    lo, hi = HU_WINDOW
    vol = torch.from_numpy(np.clip((hu - lo) / (hi - lo), 0.0, 1.0))[None, None]
    vol = F.interpolate(vol, scale_factor=2, mode="trilinear", align_corners=False)  # 3 mm -> 1.5 mm
    start = [(n - SIZE) // 2 for n in vol.shape[2:]]
    crop = vol[:, :, start[0]:start[0] + SIZE, start[1]:start[1] + SIZE, start[2]:start[2] + SIZE]
    assert crop.shape == (1, 1, SIZE, SIZE, SIZE) and 0.2 < float(crop.mean()) < 0.8 and float(crop.std()) > 0.05
    return crop.contiguous()


def train_losses(model, volume: torch.Tensor, steps: int, lr: float, warmup: int = 10) -> list[float]:
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup))
    masks = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(volume, generator=masks).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["gaussian", "voxel"])
def test_tiny_model_overfits_one_real_ct_crop(ct_crop, objective):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors; avoids contention on the shared 2-core machine
    try:
        torch.manual_seed(0)
        model = build_model(get_config("tiny", img_size=SIZE, patch_size=12, objective=objective, num_gaussians=64))
        losses = train_losses(model, ct_crop, steps=100, lr=1e-3)
    finally:
        torch.set_num_threads(threads)
    first, last = float(np.mean(losses[:5])), float(np.mean(losses[-10:]))
    assert np.isfinite(losses).all()
    assert last < 0.3 * first, f"{objective}: loss {first:.4f} -> {last:.4f}"
    # and better than predicting an empty volume on the masked voxels
    assert last < 0.5 * float((ct_crop ** 2).mean())
