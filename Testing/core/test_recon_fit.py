"""3DGR-CT loop mechanics with a toy projector (axis sums of the rendered volume):
parameterisation, learning rates, densify/prune bookkeeping, TV sub-volumes, resume."""
import math

import pytest
import torch

from medgmae_core.gaussians import GaussianSet
from medgmae_core.recon.fit import (FitConfig, GaussianParams, ReconstructionFit, build_optimizer, densify_and_prune,
                                    densify_candidates,
                                    DensifyStats, split_children, subvolume_gaussians, xyz_learning_rate)
from medgmae_core.render import render_reference as render_volume  # dense, no JIT: tiny volumes here

SHAPE = (12, 12, 12)


def toy_project(g, views):
    v = render_volume(g, SHAPE)[0]
    p = torch.stack([v.sum(0), v.sum(1), v.sum(2)])[None]  # 3 orthogonal "views"
    return p if views is None else p[:, views]


def _gaussians(k, seed, sigma=(0.06, 0.12)):
    return GaussianSet.random(1, k, sigma_range=sigma, generator=torch.Generator().manual_seed(seed),
                              dtype=torch.float64)


def test_parameterisation_roundtrip():
    g = _gaussians(9, 0)
    p = GaussianParams.from_gaussians(g, max_intensity=2.0)
    back = p.gaussians()
    assert torch.allclose(back.centres, g.centres) and torch.allclose(back.scales, g.scales)
    assert torch.allclose(back.intensities, g.intensities, atol=1e-9)
    assert torch.allclose(back.covariances(), g.covariances(), atol=1e-12)
    # intensity is bounded by the stated maximum whatever the raw value
    p.raw_intensity.data.fill_(50.0)
    assert float(p.intensities().detach().max()) <= 2.0
    with pytest.raises(ValueError, match="max_intensity"):
        GaussianParams.from_gaussians(g, max_intensity=0.0)


def test_xyz_learning_rate_is_exponential():
    assert xyz_learning_rate(0, 100, 2e-3, 2e-6) == pytest.approx(2e-3)
    assert xyz_learning_rate(100, 100, 2e-3, 2e-6) == pytest.approx(2e-6)
    assert xyz_learning_rate(50, 100, 2e-3, 2e-6) == pytest.approx(math.sqrt(2e-3 * 2e-6))
    cfg = FitConfig()
    opt = build_optimizer(GaussianParams.from_gaussians(_gaussians(3, 1), 2.0), cfg)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"xyz": 2e-3, "scale": 5e-3, "rotation": 1e-3, "intensity": 0.05}
    assert cfg.lr_horizon == 30_000
    with pytest.raises(ValueError, match="lr_horizon"):
        FitConfig(lr_horizon=0).validate()


def test_xyz_learning_rate_follows_the_fixed_horizon_not_iters():
    """3DGR-CT decays the position lr over a fixed horizon: a 20-iteration run keeps ~2e-3, and the lr at an
    iteration does not depend on how many iterations the run has."""
    from medgmae_core.recon.fit import ReconstructionFit

    seen = {}
    for iters, horizon in ((20, 30_000), (40, 30_000), (20, 20)):
        cfg = FitConfig(iters=iters, lr_horizon=horizon, eval_every=iters, densify_from=10_000)
        params = GaussianParams.from_gaussians(_gaussians(4, 3), 2.0)
        fit = ReconstructionFit(params, torch.ones(1, 1, 4, 4), lambda g, v: g.intensities.sum() * torch.ones(1, 1, 4, 4),
                                (4, 4, 4), cfg)
        for it in range(iters):
            fit.step(it)
            if it == 19:
                seen[(iters, horizon)] = fit.optimizer.param_groups[0]["lr"]
    assert seen[(20, 30_000)] == seen[(40, 30_000)] == pytest.approx(xyz_learning_rate(19, 30_000, 2e-3, 2e-6))
    assert seen[(20, 30_000)] > 1.9e-3
    assert seen[(20, 20)] < 3e-6  # the old behaviour (horizon = iters) would have decayed to ~2e-6


def _params_with_state(k=6):
    g = _gaussians(k, 2)
    g = GaussianSet(g.centres, g.scales, g.quaternions, torch.full_like(g.intensities, 0.5))
    p = GaussianParams.from_gaussians(g, max_intensity=2.0)
    cfg = FitConfig(grad_threshold=0.5, split_scale_voxels=1.1, max_growth=1.0)
    opt = build_optimizer(p, cfg)
    loss = sum((t ** 2).sum() for t in p.tensors())
    loss.backward()
    opt.step()
    return p, opt, cfg


def test_clone_keeps_volume_and_split_replaces_parent():
    p, opt, cfg = _params_with_state()
    scale_vox = p.scales().max(-1).values.detach() * 11
    parent_int = p.intensities().detach()
    parent_scales = p.scales().detach()
    stats = DensifyStats.zeros(6, p.xyz)
    stats.accumulate(torch.ones(6, 3))  # every Gaussian above the threshold
    small = scale_vox <= cfg.split_scale_voxels
    n_small, n_large = int(small.sum()), int((~small).sum())
    assert n_small and n_large  # the random set has both kinds
    counts = densify_and_prune(p, opt, stats, cfg, SHAPE)
    assert counts["cloned"] == n_small and counts["split"] == n_large and counts["pruned"] == 0
    assert p.num_gaussians == 6 + n_small + n_large
    # the optimizer follows the new tensors, with zero moments for the new Gaussians
    assert opt.param_groups[0]["params"][0] is p.xyz
    state = opt.state[p.xyz]
    assert state["exp_avg"].shape == p.xyz.shape
    kept = 6 - n_large
    assert bool((state["exp_avg"][:kept] != 0).any()) and bool((state["exp_avg"][kept:] == 0).all())
    g = p.gaussians().detach()
    # split children carry 0.8 of the parent's intensity each; clone and parent share it
    assert torch.allclose(g.intensities[0, -2 * n_large:], 0.8 * parent_int[~small].repeat(2), atol=1e-4)
    assert torch.allclose(g.intensities[0, :kept], parent_int[small] / 2, atol=1e-4)
    assert torch.allclose(g.intensities[0, kept:kept + n_small], parent_int[small] / 2, atol=1e-4)
    # the split axis (the longest) shrinks by 1.6, the others are kept
    child = g.scales[0, -2 * n_large:-n_large]
    assert torch.allclose(child.prod(-1), parent_scales[~small].prod(-1) / 1.6, rtol=1e-6)


def test_split_keeps_mass_mean_and_covariance():
    g = _gaussians(7, 9)
    p = GaussianParams.from_gaussians(g, max_intensity=2.0)
    ch = split_children(*(t.detach() for t in p.tensors()))
    kids = GaussianParams(ch["xyz"], ch["raw_scale"], ch["raw_rotation"], ch["raw_intensity"], 2.0).gaussians().detach()
    a, b = kids.select(torch.arange(7)), kids.select(torch.arange(7, 14))
    mass = lambda s: s.intensities * s.scales.prod(-1)  # noqa: E731  (times (2 pi)^1.5)
    assert torch.allclose(mass(a) + mass(b), mass(g), rtol=1e-6)
    mean = (a.centres + b.centres) / 2
    inside = ((g.centres > 0.2) & (g.centres < 0.8)).all(-1)[0]  # children not clamped at the border
    assert torch.allclose(mean[0, inside], g.centres[0, inside], atol=1e-12)
    d = a.centres - mean
    cov = (a.covariances() + b.covariances()) / 2 + d[..., :, None] * d[..., None, :]
    assert torch.allclose(cov[0, inside], g.covariances()[0, inside], atol=1e-10)


def test_clone_only_is_exact():
    p, opt, cfg = _params_with_state()
    cfg.split_scale_voxels = 1e9  # everything counts as small
    before = render_volume(p.gaussians().detach(), SHAPE)
    stats = DensifyStats.zeros(6, p.xyz)
    stats.accumulate(torch.ones(6, 3))
    densify_and_prune(p, opt, stats, cfg, SHAPE)
    assert p.num_gaussians == 12
    assert torch.allclose(render_volume(p.gaussians().detach(), SHAPE), before, atol=1e-6)


def test_prune_and_caps():
    p, opt, cfg = _params_with_state()
    with torch.no_grad():
        p.raw_intensity[0] = -30.0   # tiny intensity
        p.raw_scale[1] = math.log(1e-4)  # tiny scale (0.0011 voxel)
    stats = DensifyStats.zeros(6, p.xyz)
    counts = densify_and_prune(p, opt, stats, cfg, SHAPE)  # no gradient: nothing grows
    assert counts == {"cloned": 0, "split": 0, "pruned": 2, "num_gaussians": 4}
    # growth cap: only the largest gradients densify
    stats = DensifyStats.zeros(4, p.xyz)
    stats.accumulate(torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [3.0, 0, 0], [0.1, 0, 0]]))
    cfg.max_gaussians = 6
    counts = densify_and_prune(p, opt, stats, cfg, SHAPE)
    assert counts["cloned"] + counts["split"] == 2 and p.num_gaussians <= 6 + counts["split"]


def test_relative_densify_criterion_is_scale_free():
    grad = torch.tensor([0.0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]) * 1e-6  # all far below the absolute 2e-4
    cfg = FitConfig(grad_threshold=2e-4, densify_fraction=0.2)
    picked = densify_candidates(grad, cfg)
    assert picked.tolist() == [False] * 9 + [True, True]  # the top 20% of the 10 moving Gaussians
    relative = FitConfig(grad_threshold=math.inf, densify_fraction=0.2)
    assert torch.equal(densify_candidates(grad, relative), picked)
    assert torch.equal(densify_candidates(grad * 1e3, relative), picked)  # the same whatever the units
    cfg.densify_fraction = 0.0
    assert not densify_candidates(grad, cfg).any()  # absolute only: nothing reaches 2e-4
    cfg.grad_threshold = 4.5e-6
    assert densify_candidates(grad, cfg).sum() == 6  # absolute: 5e-6 .. 1e-5
    cfg.densify_fraction = 0.2
    assert densify_candidates(torch.zeros(5), cfg).sum() == 0  # Gaussians that never moved never densify
    with pytest.raises(ValueError, match="densify_fraction"):
        FitConfig(densify_fraction=1.5).validate()


def test_relative_criterion_densifies_when_gradients_are_tiny():
    p, opt, cfg = _params_with_state()
    cfg.grad_threshold, cfg.densify_fraction = 1.0, 0.5
    stats = DensifyStats.zeros(6, p.xyz)
    stats.accumulate(torch.tensor([[1e-7, 0, 0], [2e-7, 0, 0], [3e-7, 0, 0], [4e-7, 0, 0], [5e-7, 0, 0],
                                   [6e-7, 0, 0]]))
    counts = densify_and_prune(p, opt, stats, cfg, SHAPE)
    assert counts["cloned"] + counts["split"] == 3 and p.num_gaussians == 6 + 3


def test_subvolume_render_matches_crop_of_full_render():
    g = _gaussians(5, 3, sigma=(0.08, 0.15))
    shape = (17, 17, 17)
    full = render_volume(g, shape, cutoff=None)[0]
    lower = torch.tensor([4 / 16, 8 / 16, 2 / 16], dtype=torch.float64)
    sub = subvolume_gaussians(g, lower, 0.5, cutoff=30.0)
    part = render_volume(sub, (9, 9, 9), cutoff=None)[0]
    assert torch.allclose(part, full[4:13, 8:17, 2:11], atol=1e-10)


def test_fit_improves_and_resume_is_exact(tmp_path):
    gt = _gaussians(4, 5, sigma=(0.1, 0.15))
    ref = render_volume(gt, SHAPE)[0]
    meas = toy_project(gt, None)
    init = _gaussians(8, 6, sigma=(0.08, 0.1))
    cfg = FitConfig(iters=20, eval_every=10, densify_every=10, densify_from=10, grad_threshold=1e-4,
                    lr_xyz=1e-2, views_per_iter=2, tv_weight=1e-3, tv_size=6)

    def make():
        params = GaussianParams.from_gaussians(init, max_intensity=2.0)
        return ReconstructionFit(params, meas, toy_project, SHAPE, cfg, reference=ref, render=render_volume)

    straight = make()
    res = straight.run()
    assert [h["iteration"] for h in res.history] == [0, 10, 20]
    assert res.history[-1]["psnr"] > res.history[0]["psnr"] + 1
    assert res.densify_log and res.densify_log[0]["num_gaussians"] != 8

    # run 12 iterations, checkpoint through a file, resume in a fresh object
    half = make()
    while half.result.iterations < 12:
        half.step(half.result.iterations)
        half.result.iterations += 1
        if half.result.iterations % 10 == 0:
            half.evaluate(half.result.iterations)
    torch.save(half.state_dict(), tmp_path / "ck.pt")
    resumed = make()
    resumed.result.history.append({"placeholder": True})  # replaced by the checkpoint
    resumed.load_state_dict(torch.load(tmp_path / "ck.pt", weights_only=False))
    # the straight run evaluated at 0 first; the half run did not, so compare parameters, not histories
    resumed.run()
    assert torch.allclose(resumed.params.xyz, straight.params.xyz, atol=1e-12)
    assert torch.allclose(resumed.params.raw_intensity, straight.params.raw_intensity, atol=1e-12)
    with pytest.raises(ValueError, match="volume shape"):
        other = ReconstructionFit(GaussianParams.from_gaussians(init, 2.0), meas, toy_project, (12, 12, 13), cfg)
        other.load_state_dict(torch.load(tmp_path / "ck.pt", weights_only=False))
