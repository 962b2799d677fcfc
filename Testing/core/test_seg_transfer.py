"""UNETR over our ViT and loading pre-trained encoders into it (our checkpoint format and the release's)."""
from __future__ import annotations

import argparse

import pytest
import torch

from medgmae_core.model import build_model, get_config
from medgmae_core.seg.transfer import interpolate_pos_embed, load_encoder, read_pretrained
from medgmae_core.seg.unetr import UNETR, skip_layers, upsample_stages
from medgmae_core.train.checkpoint import save_checkpoint


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pretrained():
    torch.manual_seed(0)
    cfg = get_config("tiny", img_size=48, objective="voxel")
    model = build_model(cfg)
    with torch.no_grad():  # make every tensor distinct from a fresh init
        for name, p in model.encoder.named_parameters():
            if "position_embeddings" not in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model, cfg


def _release_layout(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The public release's key layout, written out by hand (timm names, ``encoder.`` prefix,
    ``encoder_pos_embed`` without a cls entry, decoder keys beside it)."""
    sd = {}
    for k, v in encoder.state_dict().items():
        if "norm_cross_attn" in k:
            continue  # MONAI-only
        if k == "patch_embedding.position_embeddings":
            sd["encoder_pos_embed"] = v.clone()
            continue
        k = (k.replace("patch_embedding.patch_embeddings", "patch_embed.proj").replace("attn.out_proj", "attn.proj")
             .replace("mlp.linear1", "mlp.fc1").replace("mlp.linear2", "mlp.fc2"))
        sd["encoder." + k] = v.clone()
    sd["decoder.blocks.0.norm1.weight"] = torch.ones(4)
    sd["gaussian_query_tokens"] = torch.zeros(1, 8, 4)
    return sd


def _assert_encoder_equal(unetr: UNETR, encoder: torch.nn.Module, *, skip_pos: bool = False,
                          with_unused: bool = False) -> int:
    """Every encoder tensor equal; ``with_unused`` also MONAI's unused norm_cross_attn (ours only)."""
    ours = unetr.vit.state_dict()
    n = 0
    for k, v in encoder.state_dict().items():
        if ("norm_cross_attn" in k and not with_unused) or (skip_pos and "position_embeddings" in k):
            continue
        assert torch.equal(ours[k], v), k
        n += 1
    return n


def test_skip_layers_and_stages():
    assert skip_layers(12) == (3, 6, 9)  # MONAI UNETR's choice
    assert skip_layers(6) == (1, 3, 4)
    assert upsample_stages((16, 16, 16)) == [(2, 2, 2)] * 4
    stages = upsample_stages((12, 12, 12))
    assert [s[0] for s in stages] == [1, 3, 2, 2]
    for p in (8, 12, 16, 24, 32):
        prod = 1
        for s in upsample_stages((p, p, p)):
            prod *= s[0]
        assert prod == p


@pytest.mark.parametrize("img,patch,depth", [((24, 36, 24), 12, 6), ((32, 32, 32), 16, 4)])
def test_unetr_shapes_any_depth_and_patch(img, patch, depth):
    cfg = get_config("tiny", img_size=img, patch_size=patch, depth=depth, embed_dim=48, num_heads=2)
    net = UNETR(cfg, 4, feature_size=4)
    out = net(torch.randn(1, 1, *img))
    assert out.shape == (1, 4, *img)
    out.sum().backward()
    assert net.vit.blocks[0].attn.qkv.weight.grad is not None


def test_our_checkpoint_transfers_exactly(pretrained, tmp_path, capsys):
    model, cfg = pretrained
    path = save_checkpoint(tmp_path / "pre.pt", model=model, config=cfg, step=3)
    unetr = UNETR(cfg, 5, feature_size=4)
    report = load_encoder(unetr, path)
    n = _assert_encoder_equal(unetr, model.encoder, with_unused=True)
    assert n == len(report.loaded) == len(model.encoder.state_dict())
    assert report.missing == [] and report.unexpected == [] and report.ignored > 0
    assert "loaded" in capsys.readouterr().err


def test_release_layout_transfers_exactly(pretrained, tmp_path):
    model, cfg = pretrained
    path = tmp_path / "release.pth"
    torch.save({"model": _release_layout(model.encoder), "args": argparse.Namespace(img_size=48), "epoch": 9}, path)
    pre = read_pretrained(path)
    assert pre.source_format == "release" and pre.patch_size == (12, 12, 12) and pre.depth == cfg.depth
    unetr = UNETR(pre.encoder_config(48), 3, feature_size=4)
    report = load_encoder(unetr, pre, verbose=False)
    assert _assert_encoder_equal(unetr, model.encoder) == len(report.loaded)
    assert len(report.unused_missing) == 2 * cfg.depth and report.ignored == 2
    # the same through a ``module.``-prefixed (DDP) bare state dict
    ddp = {"module." + k: v for k, v in _release_layout(model.encoder).items()}
    unetr2 = UNETR(cfg, 3, feature_size=4)
    load_encoder(unetr2, {"state_dict": ddp}, verbose=False)
    _assert_encoder_equal(unetr2, model.encoder)


def test_position_embedding_adapted_to_another_grid(pretrained):
    model, cfg = pretrained
    unetr = UNETR(cfg.replace(img_size=(36, 48, 60)), 3, feature_size=4)
    report = load_encoder(unetr, {"format": "medgmae-checkpoint/1", "model": model.state_dict(),
                                  "model_config": cfg.to_dict()}, verbose=False)
    assert any("interpolated" in a for a in report.adapted)
    _assert_encoder_equal(unetr, model.encoder, skip_pos=True)
    pos = unetr.vit.patch_embedding.position_embeddings
    assert pos.shape == (1, 3 * 4 * 5, cfg.embed_dim)
    # interpolation onto the same grid is the identity; onto a finer grid it keeps the corners' range
    src = model.encoder.patch_embedding.position_embeddings
    assert torch.equal(interpolate_pos_embed(src, (4, 4, 4), (4, 4, 4)), src)
    assert pos.abs().max() <= src.abs().max() + 1e-6


def test_transfer_errors(pretrained, tmp_path):
    model, cfg = pretrained
    ckpt = {"format": "medgmae-checkpoint/1", "model": model.state_dict(), "model_config": cfg.to_dict()}
    # an encoder from a different patch size
    with pytest.raises(ValueError, match=r"patch size \(12, 12, 12\).*UNETR uses patch size \(16, 16, 16\)"):
        load_encoder(UNETR(cfg.replace(img_size=48, patch_size=16), 3, feature_size=4), ckpt, verbose=False)
    # encoder weights missing: fail loudly, naming them
    partial = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.blocks.2.")}
    with pytest.raises(ValueError, match=r"missing \(blocks\.2\."):
        load_encoder(UNETR(cfg, 3, feature_size=4), {**ckpt, "model": partial}, verbose=False)
    # a deeper encoder than the UNETR: unexpected weights
    with pytest.raises(ValueError, match=r"unexpected \(blocks\.6\."):
        load_encoder(UNETR(cfg, 3, feature_size=4),
                     {**ckpt, "model": {**model.state_dict(),
                                        **{k.replace("blocks.5.", "blocks.6."): v for k, v in model.state_dict().items()
                                           if "blocks.5." in k and k.startswith("encoder.")}}}, verbose=False)
    with pytest.raises(ValueError, match="encoder width"):
        load_encoder(UNETR(cfg.replace(embed_dim=96), 3, feature_size=4), ckpt, verbose=False)
    bad = tmp_path / "bad.pt"
    torch.save({"model": {"head.weight": torch.zeros(2)}}, bad)
    with pytest.raises(ValueError, match="no encoder patch embedding"):
        read_pretrained(bad)
    with pytest.raises(FileNotFoundError):
        read_pretrained(tmp_path / "missing.pt")
