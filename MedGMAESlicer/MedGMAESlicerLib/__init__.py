"""MedGMAESlicer's library: logic, parameters, background jobs and dependency install (tested without the app)."""
from __future__ import annotations

from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[1]


def resource_path(relative: str) -> str:
    """``Resources/<relative>`` beside the module (built/installed extension) or at the repository root (source)."""
    for base in (MODULE_DIR / "Resources", MODULE_DIR.parent / "Resources"):
        if (base / relative).exists():
            return str(base / relative)
    raise FileNotFoundError(f"MedGMAESlicer resource {relative!r} not found in {MODULE_DIR / 'Resources'} "
                            f"or {MODULE_DIR.parent / 'Resources'}")
