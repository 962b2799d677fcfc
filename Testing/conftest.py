"""Shared test fixtures. Real data is used in place from ../shared/data/ct, never copied."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_CT = (REPO_ROOT / ".." / "shared" / "data" / "ct").resolve()


def _import_slicer_core_without_testing_dir() -> None:
    """slicer-core's ``slicer/__init__.py`` calls ``pkgutil.extend_path`` and imports every module of every
    ``slicer/`` folder on sys.path. pytest puts ``Testing/`` on sys.path, so ``Testing/slicer/*.py`` would be
    imported as ``slicer.*`` modules. Import slicer once, here, with ``Testing/`` hidden from sys.path."""
    import sys

    here = Path(__file__).resolve().parent
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    try:
        import slicer  # noqa: F401
    except ImportError:
        pass  # slicer-core not installed: the tests that need it skip
    finally:
        sys.path[:] = saved


_import_slicer_core_without_testing_dir()


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


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module with one torch thread: small tensors and 3D conv backward run faster on one thread than on
    two contended ones of a shared 2-core machine. Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
