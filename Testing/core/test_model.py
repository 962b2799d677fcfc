"""Models: configs, encoder/masking, Gaussian heads, MedGMAE*, voxel-MAE, losses, predict_gaussians.

Everything runs at small volumes (24^3 / 32^3) so the dense reference renderer stays cheap.
"""
from __future__ import annotations

import math

import pytest
import torch

from medgmae_core.train.optim import param_groups

from medgmae_core.gaussians import GaussianSet
from medgmae_core.model import (CONFIG_NAMES, MedGMAE, ModelConfig, ModelOutput, VoxelMAE, build_model, get_config,
                                random_masking, sincos_position_embedding_3d)
from medgmae_core.render import render_volume



pytestmark = pytest.mark.usefixtures("one_torch_thread")


SMALL = dict(img_size=24, patch_size=6, num_gaussians=8)  # 64 patches of 6^3


def small_model(objective: str = "gaussian", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(get_config("tiny", **{**SMALL, "objective": objective, **overrides}))


def volume(batch: int = 2, size: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 1, size, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------- configs
def block_params(dim: int, mlp_dim: int) -> int:
    """One MONAI TransformerBlock: qkv (+bias), out proj, 2-layer MLP, 3 LayerNorms."""
    return 3 * dim * dim + 3 * dim + dim * dim + dim + 2 * dim * mlp_dim + mlp_dim + dim + 3 * 2 * dim


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_builds_with_expected_parameter_count(name):
    cfg = get_config(name)
    with torch.device("meta"):  # no memory, no compute: 'large' has ~350M parameters
        model = build_model(cfg)
    e, d, p = cfg.embed_dim, cfg.decoder_embed_dim, math.prod(cfg.patch_size)
    encoder = (p * e + e) + cfg.depth * block_params(e, int(e * cfg.mlp_ratio)) + 2 * e + e  # conv, blocks, norm, cls
    n_enc = sum(t.numel() for n, t in model.encoder.named_parameters() if "position_embeddings" not in n)
    assert n_enc == encoder
    decoder = (e * d + d) + cfg.num_gaussians * d + cfg.decoder_depth * block_params(d, int(d * cfg.mlp_ratio)) \
        + 2 * d + (d + 1) * (3 + 3 + 4 + 1) + (d * d + d if cfg.decoder_context_radius > 0 else 0)  # context_proj
    n_dec = sum(t.numel() for n, t in model.decoder.named_parameters() if "pos_embed" not in n)
    assert n_dec == decoder
    assert model.encoder.patch_embedding.position_embeddings.shape == (1, cfg.num_patches, e)
    assert cfg.num_patches == 512 and cfg.img_size == (96, 96, 96)


def test_large_is_the_papers_model():
    cfg = get_config("large")
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio) == (1536, 12, 16, 4.0)
    assert (cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads, cfg.num_gaussians) == (528, 8, 16, 512)
    tiny = get_config("tiny")
    assert tiny.num_gaussians >= 512 and tiny.decoder_depth >= 4  # the CPU preset (issue 10)
    assert get_config("tiny").embed_dim == 192 and get_config("tiny").depth == 6 and get_config("tiny").num_heads == 3


@pytest.mark.parametrize("name", ["tiny", "base"])
def test_forward_shapes_tiny_and_base(name):
    torch.manual_seed(0)
    model = build_model(get_config(name, img_size=(24, 24, 36), patch_size=12, num_gaussians=6))
    out = model(volume(2)[..., :24, :24, :24].repeat(1, 1, 1, 1, 2)[..., :36])
    assert isinstance(out, ModelOutput)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.pred.shape == (2, 1, 24, 24, 36)
    assert out.mask.shape == (2, 2 * 2 * 3)
    assert out.gaussians.num_gaussians == 6 and out.gaussians.batch_size == 2


def test_config_roundtrip_and_overrides():
    cfg = get_config("tiny", img_size=48, objective="gaussian_star", star_multipliers=(3, 6))
    d = cfg.to_dict()
    assert d["img_size"] == [48, 48, 48] and d["name"] == "tiny"
    back = ModelConfig.from_dict(d)
    assert back == cfg and back.img_size == (48, 48, 48) and back.star_multipliers == (3, 6)
    assert build_model(d).config == cfg


@pytest.mark.parametrize("overrides, match", [
    (dict(img_size=(96, 96, 90)), r"img_size \(96, 96, 90\) is not divisible by patch_size \(12, 12, 12\).*axis 2"),
    (dict(img_size=50, patch_size=12), r"img_size .* patch_size"),
    (dict(patch_size=(12, 12)), "patch_size"),
    (dict(img_size="big"), "img_size"),
    (dict(embed_dim=200, num_heads=4), "divisible by 6"),
    (dict(embed_dim=192, num_heads=5), "num_heads"),
    (dict(objective="pixels"), "objective"),
    (dict(loss="l1"), "loss"),
    (dict(objective="voxel", loss="release"), "release"),
    (dict(mask_ratio=1.0), "mask_ratio"),
    (dict(star_multipliers=(2, 3)), "star_multipliers"),
    (dict(intensity_prior_radius=0.5, gaussian_layout="free"), "intensity_prior_radius needs"),
    (dict(intensity_prior_radius=0.5, objective="voxel"), "intensity_prior_radius needs"),
    (dict(bogus=1), r"unknown model config keys \['bogus'\]"),
])
def test_bad_configs_raise_clear_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        get_config("tiny", **overrides)


def test_unknown_config_name_and_wrong_input_shape():
    with pytest.raises(ValueError, match="unknown model config 'huge'"):
        get_config("huge")
    model = small_model()
    with pytest.raises(ValueError, match=r"imgs must have shape \[B, 1, 24, 24, 24\].*got \[2, 1, 24, 24, 30\]"):
        model(torch.rand(2, 1, 24, 24, 30))
    with pytest.raises(ValueError, match="imgs must have shape"):
        model(torch.rand(1, 24, 24, 24))


# ------------------------------------------------------------------------------ encoder, masking
def test_sincos_position_embedding():
    pe = sincos_position_embedding_3d((2, 3, 4), 12)  # 2 frequencies per axis
    assert pe.shape == (24, 12)
    # patch (d, h, w) = (1, 2, 3) is row-major index 1*12 + 2*4 + 3 = 23;
    # per axis [sin(pos*f0), sin(pos*f1), cos(pos*f0), cos(pos*f1)] with f = 1, 1/100
    row = pe[23]
    assert torch.allclose(row[0:4], torch.tensor([math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]), atol=1e-6)
    assert torch.allclose(row[4], torch.sin(torch.tensor(2.0)), atol=1e-6)  # H axis
    assert torch.allclose(row[8], torch.sin(torch.tensor(3.0)), atol=1e-6)  # W axis
    assert len({tuple(r.tolist()) for r in pe}) == 24  # every patch distinct
    with pytest.raises(ValueError, match="divisible by 6"):
        sincos_position_embedding_3d((2, 2, 2), 10)


def test_position_embeddings_are_fixed():
    model = small_model()
    assert not model.encoder.patch_embedding.position_embeddings.requires_grad
    assert not model.decoder.decoder_pos_embed.requires_grad


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.9, 0.0])
def test_masking_hides_exactly_ratio_of_tokens_and_differs_across_batch(ratio):
    batch, length = 6, 64
    x = torch.arange(length, dtype=torch.float32)[None, :, None].expand(batch, length, 2).clone()  # token i holds i
    kept, mask, ids_restore = random_masking(x, ratio, torch.Generator().manual_seed(0))
    n_masked = round(ratio * length)
    assert mask.shape == (batch, length)
    assert torch.equal(mask.sum(1), torch.full((batch,), float(n_masked)))
    assert kept.shape == (batch, length - n_masked, 2)
    for b in range(batch):  # the kept tokens are exactly the unmasked ones
        assert sorted(kept[b, :, 0].long().tolist()) == torch.nonzero(mask[b] == 0).flatten().tolist()
    assert torch.equal(torch.sort(ids_restore, 1).values, torch.arange(length).expand(batch, -1))
    if 0 < ratio:
        assert len({tuple(m.tolist()) for m in mask}) == batch  # independent per sample


def test_model_masks_the_configured_ratio():
    model = small_model(mask_ratio=0.5)
    out = model(volume(3))
    assert torch.equal(out.mask.sum(1), torch.full((3,), 32.0))
    out = model(volume(3), mask_ratio=0.75)
    assert torch.equal(out.mask.sum(1), torch.full((3,), 48.0))
    with pytest.raises(ValueError, match="mask_ratio"):
        model(volume(1), mask_ratio=1.2)


def test_patchify_order_matches_the_patch_embedding_and_roundtrips():
    model = small_model()
    cfg = model.config
    idx = torch.arange(cfg.num_patches, dtype=torch.float32).reshape(1, 1, *cfg.grid_size)
    vol = idx.repeat_interleave(6, 2).repeat_interleave(6, 3).repeat_interleave(6, 4)  # voxel -> its patch index
    patches = model.patchify(vol)
    assert patches.shape == (1, 64, 216)
    assert torch.equal(patches, torch.arange(64.0)[None, :, None].expand(1, 64, 216))
    # the Conv3d embedding enumerates patches in the same order
    conv = model.encoder.patch_embedding.patch_embeddings
    with torch.no_grad():
        emb = conv(vol).flatten(2).transpose(1, 2)  # [1, L, E]
        expect = patches @ conv.weight.reshape(conv.weight.shape[0], -1).T + conv.bias
    assert torch.allclose(emb, expect, atol=1e-3)
    x = volume(2)
    assert torch.equal(model.unpatchify(model.patchify(x)), x)
    assert torch.equal(model.mask_volume(torch.eye(64)[None, 5]), (vol == 5).float())


def test_encoder_state_dict_loads_into_monai_vit():
    from monai.networks.nets import ViT

    model = small_model()
    cfg = model.config
    vit = ViT(in_channels=1, img_size=cfg.img_size, patch_size=cfg.patch_size, hidden_size=cfg.embed_dim,
              mlp_dim=int(cfg.embed_dim * cfg.mlp_ratio), num_layers=cfg.depth, num_heads=cfg.num_heads,
              qkv_bias=True, classification=False)
    state = {k: v for k, v in model.encoder.state_dict().items() if k != "cls_token"}
    vit.load_state_dict(state, strict=True)
    assert torch.equal(vit.blocks[2].attn.qkv.weight, model.encoder.blocks[2].attn.qkv.weight)


# --------------------------------------------------------------------------------- Gaussian heads
def test_free_heads_follow_the_scale_coupling():
    model = small_model(num_gaussians=64, gaussian_layout="free", init_scale_ratio=0.8, intensity_scale=1.0)
    heads, cfg = model.decoder.heads, model.config
    assert torch.allclose(heads.head_scale.bias, torch.full((3,), -1.386), atol=1e-3)  # s0 = 0.8 / 64^(1/3) = 0.2
    i0 = cfg.target_mean / (1.0 * (2 * math.pi) ** 1.5 * 0.8 ** 3)
    assert torch.allclose(heads.head_intensity.bias, torch.tensor([math.log(i0 / (1 - i0))]), atol=1e-5)
    assert torch.count_nonzero(heads.head_centre.bias) == 0 and torch.count_nonzero(heads.head_rotation.bias) == 0
    g = model.predict_gaussians(volume(2), mask_policy="none")
    assert g.num_gaussians == 64
    assert torch.allclose(g.scales.mean(), torch.tensor(0.2), atol=0.03)
    assert torch.allclose(g.quaternions.norm(dim=-1), torch.ones(2, 64), atol=1e-6)
    assert g.centres.min() >= 0 and g.centres.max() <= 1
    with torch.no_grad():  # heads saturate through their activations, never past them
        for head in (heads.head_centre, heads.head_scale, heads.head_intensity, heads.head_rotation):
            head.bias.fill_(50.0)
    g = model.predict_gaussians(volume(1), mask_policy="none")
    assert torch.all(g.centres <= 1) and torch.all(g.scales <= 1) and torch.all(g.intensities <= 1)


def test_anchored_heads_start_on_their_anchors_and_stay_bounded():
    model = small_model(num_gaussians=64)  # 24^3 window, 4x4x4 anchors, cells of 6 voxels
    cfg, heads = model.config, model.decoder.heads
    assert cfg.anchor_grid_shape == (4, 4, 4)
    h = torch.tensor(cfg.anchor_spacing)
    assert torch.allclose(h, torch.full((3,), 24 / (4 * 23)))
    g = model.predict_gaussians(volume(1), mask_policy="none")
    # anchors at the cell centres: voxel (c + 0.5) * 6 - 0.5
    expected = ((torch.arange(4) + 0.5) * 6 - 0.5) / 23
    assert torch.allclose(heads.anchors[:4, 2], expected)
    assert (g.centres[0] - heads.anchors).abs().max() < 0.3 * h.min()  # small head weights: near the anchor
    s0 = torch.tensor(cfg.initial_scale)
    assert torch.allclose(g.scales.mean(dim=(0, 1)), s0, rtol=0.15)
    with torch.no_grad():
        heads.head_centre.bias.fill_(50.0)
        heads.head_scale.bias.fill_(50.0)
    g = model.predict_gaussians(volume(1), mask_policy="none")
    assert torch.allclose(g.centres[0], heads.anchors + cfg.anchor_offset_ratio * h, atol=1e-5)
    assert torch.allclose(g.scales[0], (cfg.max_scale_ratio * h).expand(64, 3), atol=1e-5)


@pytest.mark.parametrize("k", [64, 512, 2048])
def test_initial_render_mean_matches_the_data_mean_for_any_k(k):
    """Issue 10: the initial scale and intensity follow from k, so the first render is neither blank nor
    k-times too bright. Windowed crops have mean ~0.3 (target_mean); check within 2x on a real-like input."""
    torch.manual_seed(0)
    model = build_model(get_config("tiny", img_size=48, patch_size=12, num_gaussians=k))
    x = torch.rand(1, 1, 48, 48, 48) * 0.6  # mean 0.3
    with torch.no_grad():
        pred = model.render(model.predict_gaussians(x, mask_policy="none"))
    data_mean = float(x.mean())
    assert data_mean / 2 < float(pred.mean()) < 2 * data_mean
    assert float(pred.max()) < 3 * model.config.peak_value  # no pile-up of overlapping Gaussians
    c = model.config.effective_intensity_scale
    assert math.isclose(c, model.config.peak_value / ((2 * math.pi) ** 1.5 * model.config.init_scale_ratio ** 3))


def test_intensity_scale_and_render_match_prediction():
    model = small_model()
    torch.manual_seed(1)
    out = model(volume(1))
    assert 0 < out.gaussians.intensities.max() <= model.config.effective_intensity_scale
    again = render_volume(out.gaussians.detach(), (24, 24, 24), cutoff=model.config.render_cutoff)
    assert torch.allclose(again, out.pred[:, 0].detach(), atol=1e-5)


def test_queries_are_independent_of_the_mask():
    model = small_model(num_gaussians=5)
    for ratio in (0.0, 0.5, 0.9):
        assert model(volume(1), mask_ratio=ratio).gaussians.num_gaussians == 5
    assert model.decoder.query_tokens.shape == (1, 5, 144)
    assert abs(float(model.decoder.query_tokens.detach().std()) - 0.02) < 0.01


def test_predict_gaussians_valid_no_grad_and_restores_mode():
    model = small_model(num_gaussians=8)
    model.train()
    g = model.predict_gaussians(volume(2), mask_policy="none")
    assert isinstance(g, GaussianSet) and g.num_gaussians == 8 and g.batch_size == 2
    assert not g.centres.requires_grad
    assert model.training
    g.validate()
    model.eval()
    again = model.predict_gaussians(volume(2), mask_policy="none")  # nothing hidden: deterministic
    assert not model.training
    assert torch.allclose(again.centres, g.centres, atol=1e-5)


def test_mask_policies():
    model = small_model(num_gaussians=64)  # L = 64 patches, 4 passes of 16 visible at ratio 0.75
    x = volume(1)
    counts = {p: model.predict_gaussians(x, mask_policy=p).num_gaussians for p in ("none", "single", "average", "hidden")}
    assert counts == {"none": 64, "single": 64, "average": 256, "hidden": 64}
    # the same generator seed gives the same masks: predictions repeat
    a = model.predict_gaussians(x, mask_policy="hidden", generator=torch.Generator().manual_seed(5))
    b = model.predict_gaussians(x, mask_policy="hidden", generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.centres, b.centres)
    # complementary masks: every patch visible in exactly one pass
    noise = model.complementary_noise(1, 4, torch.Generator().manual_seed(0))
    visible = torch.stack([model.forward_encoder(x, 0.75, None, noise[p])[1] == 0 for p in range(4)])  # [P, B, L]
    assert torch.equal(visible.sum(0), torch.ones(1, 64, dtype=torch.long))
    # "average" renders the mean of the passes' renders
    avg = model.render(model.predict_gaussians(x, mask_policy="average", generator=torch.Generator().manual_seed(2)))
    passes = [model.render(model._predict_once(x, 0.75, None, None, n))
              for n in model.complementary_noise(1, 4, torch.Generator().manual_seed(2))]
    assert torch.allclose(avg, torch.stack(passes).mean(0), atol=1e-5)
    # "hidden": each Gaussian comes from a pass in which its anchor's patch was hidden
    hidden = model.predict_gaussians(x, mask_policy="hidden", generator=torch.Generator().manual_seed(2))
    per_pass = [model._predict_once(x, 0.75, None, None, n)
                for n in model.complementary_noise(1, 4, torch.Generator().manual_seed(2))]
    noise = model.complementary_noise(1, 4, torch.Generator().manual_seed(2))
    for j in (0, 17, 63):  # k = L here: Gaussian j's anchor is patch j
        shown = int(noise[0][0, j] // 16)
        src = per_pass[(shown + 1) % 4]
        assert torch.allclose(hidden.centres[0, j], src.centres[0, j])
        assert visible.shape[0] == 4
    with pytest.raises(ValueError, match="mask_policy"):
        model.predict_gaussians(x, mask_policy="everything")
    assert model.predict_gaussians(x, mask_ratio=0.0).num_gaussians == 64  # ratio 0 alone means "none"


# ----------------------------------------------------------------------------------------- losses
def test_masked_loss_uses_only_masked_voxels_release_loss_whole_volume():
    model = small_model()
    x = volume(2)
    pred = volume(2, seed=1)
    mask = torch.zeros(2, 64)
    mask[:, ::3] = 1  # 22 masked patches per sample
    mv = model.mask_volume(mask).bool()
    masked = model.forward_loss(x, pred, mask)
    assert torch.allclose(masked, ((pred - x) ** 2)[mv].mean())
    noise = torch.rand_like(x) * (~mv)  # perturb visible voxels only
    assert torch.allclose(model.forward_loss(x + noise, pred, mask), masked)  # visible target ignored
    assert torch.allclose(model.forward_loss(x, pred + noise, mask), masked)  # visible prediction ignored
    assert not torch.allclose(model.forward_loss(x + torch.rand_like(x) * mv, pred, mask), masked)

    nothing = torch.zeros(2, 64)  # mask_ratio 0: the plain mean
    assert torch.allclose(model.forward_loss(x, pred, nothing), ((pred - x) ** 2).mean())

    model.config.loss = "release"
    release = model.forward_loss(x, pred, mask)
    assert torch.allclose(release, ((pred - x * mv) ** 2).mean())
    assert not torch.allclose(model.forward_loss(x, pred + noise, mask), release)  # visible region pushed to 0
    assert torch.allclose(model.forward_loss(x + noise, pred, mask), release)  # target is x * mask


def test_visible_loss_weight_adds_the_weighted_visible_mse():
    model = small_model(visible_loss_weight=0.25)
    x, pred = volume(2), volume(2, seed=1)
    mask = torch.zeros(2, 64)
    mask[:, ::3] = 1
    mv = model.mask_volume(mask).bool()
    expected = ((pred - x) ** 2)[mv].mean() + 0.25 * ((pred - x) ** 2)[~mv].mean()
    assert torch.allclose(model.forward_loss(x, pred, mask), expected)
    with pytest.raises(ValueError, match="visible_loss_weight must be >= 0"):
        get_config("tiny", visible_loss_weight=-1.0)
    with pytest.raises(ValueError, match="visible_loss_weight adds to the masked loss"):
        get_config("tiny", objective="voxel", visible_loss_weight=0.5)


@pytest.mark.parametrize("objective, overrides", [
    ("gaussian", {}), ("gaussian", {"loss": "release"}), ("gaussian_star", {}),
    ("gaussian_star", {"star_combine": "sum"}), ("voxel", {}), ("gaussian", {"intensity_prior_radius": 0.5}),
])
def test_loss_is_finite_and_reaches_every_trainable_parameter(objective, overrides):
    model = small_model(objective, num_gaussians=4, **overrides)
    out = model(volume(2))
    assert torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert dead == []
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert all("pos_embed" in n or "position_embeddings" in n or "norm_cross_attn" in n for n in frozen)


def test_no_weight_decay_groups():
    model = small_model("gaussian_star")
    skip = model.no_weight_decay()
    for name in ("encoder.cls_token", "decoder.query_tokens", "encoder.norm.weight", "encoder.blocks.0.attn.qkv.bias",
                 "decoder.heads.head_scale.bias", "levels.0.child_embed",
                 "encoder.patch_embedding.position_embeddings"):
        assert name in skip
    for name in ("encoder.blocks.0.attn.qkv.weight", "encoder.patch_embedding.patch_embeddings.weight",
                 "decoder.heads.head_scale.weight", "levels.1.delta_centre.weight"):
        assert name not in skip
    assert "mask_token" in {n.rsplit(".", 1)[-1] for n in small_model("voxel").no_weight_decay()}
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable)


# ------------------------------------------------------------------------------------- MedGMAE*
def test_star_levels_are_relative_to_level_0_as_eq4():
    model = small_model("gaussian_star", num_gaussians=8, star_multipliers=(2, 6))
    assert isinstance(model, MedGMAE) and len(model.levels) == 2
    out = model(volume(2))
    assert [g.num_gaussians for g in out.levels] == [8, 16, 48] and model.num_output_gaussians == 48
    base, lvl1, lvl2 = out.levels
    cfg = model.config
    shrinks = cfg.star_level_shrinks
    s0 = min(cfg.initial_scale)
    assert math.isclose(shrinks[0], s0 * (1 - 2 ** (-1 / 3))) and math.isclose(shrinks[1], s0 * (1 - 6 ** (-1 / 3)))
    # each level starts with the same render mean (its scale shrinks with its count)
    means = [float(model.render(g.detach()).mean()) for g in out.levels]
    assert max(means) / min(means) < 2.0  # the smaller children lose less mass past the edges
    c = cfg.effective_intensity_scale
    for child, m, shrink in ((lvl1, 2, shrinks[0]), (lvl2, 6, shrinks[1])):
        ref = base.map(lambda t: t.repeat_interleave(m, dim=1))  # level 0, not the level above
        ds = child.scales - ref.scales + shrink
        assert ds.abs().max() <= cfg.star_scale_range + 1e-6
        assert (child.centres - ref.centres).abs().max() <= cfg.star_centre_range + 1e-6
        assert (child.intensities - ref.intensities).abs().max() <= c * cfg.star_sigma_intensity + 1e-6
        assert torch.allclose(child.scales, ref.scales - shrink, atol=0.3 * cfg.star_scale_range)  # residuals start small
    # saturated residuals reach exactly the documented bounds, from level 0; scales clamp at star_min_scale
    with torch.no_grad():
        model.levels[1].delta_centre.bias.fill_(100.0)
        model.levels[1].delta_scale.bias.fill_(-100.0)
    sets = [model.predict_gaussians(volume(1), level=i, mask_policy="none") for i in range(3)]
    assert torch.allclose(sets[2].centres, sets[0].centres.repeat_interleave(6, 1) + cfg.star_centre_range, atol=1e-5)
    lowest = (sets[0].scales.repeat_interleave(6, 1) - cfg.star_scale_range - shrinks[1]).clamp_min(cfg.star_min_scale)
    assert torch.allclose(sets[2].scales, lowest, atol=1e-6)
    with pytest.raises(ValueError, match="level"):
        model.predict_gaussians(volume(1), level=3)


def test_star_parent_relative_variant_chains_levels():
    model = small_model("gaussian_star", num_gaussians=8, star_multipliers=(2, 6), star_relative_to="parent")
    with torch.no_grad():
        model.levels[1].delta_centre.bias.fill_(100.0)
        model.levels[0].delta_centre.bias.fill_(100.0)
    sets = [model.predict_gaussians(volume(1), level=i, mask_policy="none") for i in range(3)]
    r = model.config.star_centre_range
    assert torch.allclose(sets[2].centres, sets[0].centres.repeat_interleave(6, 1) + 2 * r, atol=1e-5)


def test_star_sum_combines_all_levels_in_one_render():
    model = small_model("gaussian_star", num_gaussians=4, star_combine="sum")
    out = model(volume(1))
    assert out.gaussians.num_gaussians == 4 * (1 + 2 + 4) == model.num_output_gaussians
    again = render_volume(out.gaussians.detach(), (24, 24, 24))
    assert torch.allclose(again, out.pred[:, 0].detach(), atol=1e-5)
    assert model.predict_gaussians(volume(1), mask_policy="none").num_gaussians == 28


def test_star_levels_loss_is_mean_of_level_losses():
    model = small_model("gaussian_star", num_gaussians=4)
    x = volume(1)
    out = model(x, generator=torch.Generator().manual_seed(3))
    per_level = [model.forward_loss(x, model.render(g), out.mask) for g in out.levels]
    assert torch.allclose(out.loss, torch.stack(per_level).mean(), atol=1e-6)


# ------------------------------------------------------------------------------------ voxel-MAE
def test_voxel_mae_shapes_and_loss():
    model = small_model("voxel")
    assert isinstance(model, VoxelMAE) and build_model(get_config("tiny", objective="voxel")).__class__ is VoxelMAE
    x = volume(2)
    latent, mask, ids_restore = model.forward_encoder(x, 0.75)
    assert latent.shape == (2, 1 + 16, 192) and mask.shape == (2, 64)
    patches = model.forward_decoder(latent, ids_restore)
    assert patches.shape == (2, 64, 6 ** 3)
    out = model(x)
    assert out.pred.shape == x.shape and out.gaussians is None
    # masked MSE of the patch predictions: visible patches do not count
    target = model.patchify(x)
    loss = model.forward_loss(x, patches, mask)
    assert torch.allclose(loss, ((patches - target) ** 2).mean(-1)[mask.bool()].mean(), atol=1e-6)
    bumped = patches + (1 - mask)[..., None] * 5.0
    assert torch.allclose(model.forward_loss(x, bumped, mask), loss)


@pytest.mark.parametrize("objective", ["gaussian", "gaussian_star"])
def test_bf16_autocast_keeps_heads_and_renderer_in_fp32(objective):
    model = small_model(objective, num_gaussians=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(volume(1))
    assert out.gaussians.dtype == torch.float32 and out.pred.dtype == torch.float32
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.decoder.heads.head_centre.weight.grad.abs().sum() > 0


def test_evaluation_window_mask_is_the_mask_the_model_is_scored_on():
    from medgmae_core.train import evaluation as ev

    model = small_model()
    noise = ev.window_noise(model.num_patches, 7)[None]
    _, mask, _ = model.forward_encoder(volume(1), None, None, noise)
    expected = model.mask_volume(mask)[0, 0].bool()
    assert torch.equal(ev.window_mask(model, 7), expected) and 0 < expected.float().mean() < 1


def test_interpolation_baseline_is_scipys_normalised_convolution_and_is_scored():
    from scipy import ndimage

    from medgmae_core.train import evaluation as ev

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 20, 18, 16, generator=gen, dtype=torch.float64)
    visible = torch.rand(2, 1, 20, 18, 16, generator=gen) > 0.7
    out = ev.interpolate_visible(x, visible, 2.5)
    for i in range(2):  # the blur is scipy's gaussian_filter with zeros outside
        num = ndimage.gaussian_filter((x[i, 0] * visible[i, 0]).numpy(), 2.5, mode="constant")
        den = ndimage.gaussian_filter(visible[i, 0].double().numpy(), 2.5, mode="constant")
        torch.testing.assert_close(out[i, 0], torch.from_numpy(num / den), rtol=0, atol=1e-9)
    # a constant volume is filled exactly, even where no visible voxel reaches (the visible mean)
    flat = torch.full((1, 1, 40, 8, 8), 0.3, dtype=torch.float64)
    corner = torch.zeros_like(flat, dtype=torch.bool)
    corner[..., :2, :2, :2] = True
    torch.testing.assert_close(ev.interpolate_visible(flat, corner, 1.0), flat, rtol=0, atol=1e-12)
    # evaluate_masked reports it: on a smooth ramp it beats the constant by far
    model = small_model()
    ramp = torch.linspace(0, 1, 24).view(24, 1, 1).expand(24, 24, 24).clone()
    result = ev.evaluate_masked(model, [ev.EvalWindow("ramp", ramp)])
    assert result["psnr_interpolation"] > result["psnr_constant"] + 5
    assert result["gain_over_interpolation_db"] == pytest.approx(result["psnr"] - result["psnr_interpolation"])


def test_local_context_weights_nearby_tokens_and_batches_per_sample_queries():
    from medgmae_core.model.vit import local_context

    keys = torch.tensor([[[0.0, 0, 0], [5.0, 0, 0]]])  # [1, 2, 3]
    tokens = torch.tensor([[[1.0], [3.0]]])
    near_first = local_context(torch.tensor([[0.0, 0, 0]]), keys, tokens, radius=1.0)
    assert torch.allclose(near_first, torch.tensor([[[1.0]]]), atol=1e-4)  # the far token has ~e^-12.5 weight
    middle = local_context(torch.tensor([[2.5, 0, 0]]), keys, tokens, radius=1.0)
    assert torch.allclose(middle, torch.tensor([[[2.0]]]))
    q, k, t = torch.rand(2, 5, 3), torch.rand(2, 7, 3), torch.rand(2, 7, 4)
    per_sample = torch.stack([local_context(q[i], k[i:i + 1], t[i:i + 1], 1.0)[0] for i in range(2)])
    assert torch.allclose(local_context(q, k, t, 1.0), per_sample)


def test_intensity_prior_starts_from_the_visible_level_and_follows_the_input():
    model = small_model(intensity_prior_radius=0.5).eval()
    model.decoder.heads.head_intensity.weight.data.zero_()  # no correction: the prior alone
    peak = model.config.peak_value
    flat = torch.full((1, 1, 24, 24, 24), 0.6)
    g = model.predict_gaussians(flat, mask_policy="single")
    head_units = g.intensities / model.config.effective_intensity_scale
    torch.testing.assert_close(head_units, torch.full_like(head_units, 0.6 / peak), rtol=0, atol=1e-5)
    halves = torch.full((1, 1, 24, 24, 24), 0.1)
    halves[..., 12:] = 0.9  # bright where W >= 12
    g = model.predict_gaussians(halves, mask_policy="none")
    bright = g.centres[0, :, 2] > 0.5
    assert bright.any() and (~bright).any()
    assert g.intensities[0, bright].min() > 2 * g.intensities[0, ~bright].max()
    # the untrained render is a smooth copy of the input, not a flat mean
    pred = model.render(g)[0, 0]
    assert pred[..., 18:].mean() > 2 * pred[..., :6].mean()
    latent, _, ids_restore = model.forward_encoder(halves, 0.5)
    with pytest.raises(ValueError, match="needs patch_means"):
        model.forward_decoder(latent, ids_restore)


def test_interpolation_prior_is_the_visible_interpolation_at_each_anchor():
    from medgmae_core.model.gaussian_decoder import anchor_grid
    from medgmae_core.model.interpolation import interpolate_visible, interpolate_visible_on_grid

    model = small_model(intensity_prior_radius=1.0, intensity_prior_sigma=0.25).eval()
    model.decoder.heads.head_intensity.weight.data.zero_()  # no correction: the prior alone
    c, peak = model.config.effective_intensity_scale, model.config.peak_value
    flat = torch.full((1, 1, 24, 24, 24), 0.6)
    g = model.predict_gaussians(flat, mask_policy="single")
    torch.testing.assert_close(g.intensities / c, torch.full_like(g.intensities, 0.6 / peak), rtol=0, atol=1e-5)
    # slow reference: the normalised convolution summed voxel by voxel at each anchor (voxel a * (N - 1))
    x = volume(1)
    noise = torch.rand(1, model.num_patches, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        latent, mask, ids_restore = model.forward_encoder(x, 0.75, None, noise)
        sets = model.forward_decoder(latent, ids_restore, model.intensity_prior_input(x))
    sigma = 0.25 * model.config.patch_size[0]
    visible = (model.mask_volume(mask) < 0.5)[0, 0].double()
    grid = torch.stack(torch.meshgrid(*[torch.arange(24.0, dtype=torch.float64)] * 3, indexing="ij"), -1)
    for j in range(model.config.num_gaussians):
        centre = anchor_grid(model.config)[j] * 23
        offset = (grid - centre).abs()
        w = torch.exp(-0.5 * ((grid - centre) ** 2).sum(-1) / sigma ** 2) * (offset <= int(4 * sigma + 0.5)).all(-1)
        reached = (w * visible).sum() > 0  # else no visible voxel within reach: the mean of the visible voxels
        level = (w * visible * x[0, 0]).sum() / (w * visible).sum() if reached else x[0, 0][visible > 0].mean()
        torch.testing.assert_close(float(sets[-1].intensities[0, j] / c), float(level / peak), rtol=0, atol=1e-5)
    # on integer grid points it is exactly the whole-volume interpolation
    axes = [torch.tensor([0.0, 5, 23]), torch.tensor([2.0, 11]), torch.tensor([7.0])]
    on_grid = interpolate_visible_on_grid(x.double(), visible[None, None] > 0, sigma, axes)
    field = interpolate_visible(x.double(), visible[None, None] > 0, sigma)[0, 0]
    expected = field[[0, 5, 23]][:, [2, 11]][:, :, [7]]
    torch.testing.assert_close(on_grid[0], expected, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="intensity_prior_sigma picks the interpolation prior"):
        get_config("tiny", intensity_prior_sigma=0.25)


def test_models_without_the_prior_ignore_patch_means():
    model = small_model().eval()
    x = volume(1)
    latent, _, ids_restore = model.forward_encoder(x, 0.5, torch.Generator().manual_seed(1))
    a = model.forward_decoder(latent, ids_restore)[0]
    assert model.intensity_prior_input(x) is None
    b = model.forward_decoder(latent, ids_restore, torch.ones(1, model.num_patches))[0]
    torch.testing.assert_close(a.intensities, b.intensities, rtol=0, atol=0)
