"""Fixtures for the Slicer module tests: a real slicer-core MRML scene and a tiny randomly initialised checkpoint."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedGMAESlicer"))

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=2, decoder_embed_dim=36, decoder_depth=1,
            decoder_num_heads=2, num_gaussians=24, render_backend="torch")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny MedGMAE with random weights, saved through ``medgmae_core.train.checkpoint``."""
    import torch
    from medgmae_core.model import build_model, get_config
    from medgmae_core.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    config = get_config("tiny", **TINY)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, model=build_model(config), config=config)
    return path


@pytest.fixture()
def session():
    """A fresh headless Slicer scene with Red/Yellow/Green slice views."""
    from MedGMAESlicerLib.headless import create_session

    s = create_session()
    s.add_slice_views()
    yield s
    s.scene.Clear(1)
