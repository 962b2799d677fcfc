"""MedGMAESlicer's library: logic (prediction, display and background parts), parameters, jobs and dependency
install (tested without the app).

Nothing here imports torch or ``medgmae_core`` at import time: the module loads, and tells what is missing, in a
Slicer where the dependencies are not installed yet.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[1]
RESOURCES_DIR = MODULE_DIR / "Resources"  # the module's own Resources/ (ScriptedLoadableModule.resourcePath)

# Every submodule, dependencies first: the order the developer "Reload" re-imports them in.
SUBMODULES = ("compat", "parameters", "jobs", "jobpanel", "install", "prediction", "background", "display",
              "logic", "headless", "panel", "selftest")


def use_source_checkout_library() -> str | None:
    """A developer who added only this module's folder to Slicer's module paths: the repository's ``medgmae_core``
    sits next to it, so make that importable (appended to ``sys.path``). An installed extension bundles its own
    copy beside the module, and an installed ``medgmae_core`` wins too: then nothing changes. Returns the folder
    added, or None."""
    checkout = MODULE_DIR.parent
    if not (checkout / "medgmae_core" / "__init__.py").is_file() or importlib.util.find_spec("medgmae_core"):
        return None
    sys.path.append(str(checkout))
    return str(checkout)


use_source_checkout_library()


def resource_path(relative: str) -> str:
    """``Resources/<relative>`` beside the module (source tree, build tree and installed extension alike)."""
    path = RESOURCES_DIR / relative
    if not path.exists():
        raise FileNotFoundError(f"MedGMAESlicer resource {relative!r} not found in {RESOURCES_DIR}")
    return str(path)


def reload_submodules() -> list[str]:
    """Re-import every ``MedGMAESlicerLib`` submodule (the module widget's developer "Reload"), in dependency
    order, so edits to the library take effect without restarting Slicer. Returns the reloaded names."""
    package = importlib.reload(sys.modules[__name__])
    reloaded = []
    for name in SUBMODULES:
        full = f"{__name__}.{name}"
        if full in sys.modules:
            importlib.reload(sys.modules[full])
        else:
            importlib.import_module(full)
        reloaded.append(full)
    return reloaded if package is not None else []
