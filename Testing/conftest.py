"""Shared test fixtures. Real data is used in place from ../shared/data/ct, never copied."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_CT = (REPO_ROOT / ".." / "shared" / "data" / "ct").resolve()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_ct() -> Path:
    """``../shared/data/ct``: real CT and projection data with provenance."""
    if not (SHARED_CT / "SOURCE.md").exists():
        pytest.fail(f"real test data not found at {SHARED_CT}; the repo expects ../shared/data/ct beside it")
    return SHARED_CT


@pytest.fixture(scope="session")
def small_real_ct(shared_ct: Path) -> Path:
    """122x101x30, 3 mm, upper abdomen (TotalSegmentator example_ct_sm)."""
    return shared_ct / "totalsegmentator" / "example_ct_sm.nii.gz"
