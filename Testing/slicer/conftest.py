"""Fixtures for the Slicer module tests: a real slicer-core MRML scene and a tiny randomly initialised checkpoint."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedGMAESlicer"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny MedGMAE (24 Gaussian queries, 32^3 window) with random weights, saved through medgmae_core.train.checkpoint."""
    from MedGMAESlicerLib.selftest import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture()
def session():
    """A fresh headless Slicer scene with Red/Yellow/Green slice views."""
    from MedGMAESlicerLib.headless import create_session

    s = create_session()
    s.add_slice_views()
    yield s
    s.scene.Clear(1)
