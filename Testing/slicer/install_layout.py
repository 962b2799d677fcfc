"""What ``make install`` puts in the extension's ``qt-scripted-modules`` folder, as a Python function.

It mirrors ``MedGMAESlicer/CMakeLists.txt`` without reading it: the module scripts (``MedGMAESlicer.py`` and
every ``MedGMAESlicerLib/*.py``), everything in ``MedGMAESlicer/Resources``, and the bundled ``medgmae_core``
(every ``*.py`` below it, ``weights/*.pt``, ``configs/*.yaml``). ``test_installed_layout.py`` checks this list
against the CMakeLists' lists and globs, and against a real CMake configure/build/install of the extension with a
stand-in Slicer (``cmake_slicer_stub/``), so the three cannot drift apart.
"""
from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODULE_SOURCE = REPO / "MedGMAESlicer"
QTSCRIPTEDMODULES = "lib/Slicer-5.10/qt-scripted-modules"  # Slicer_QTSCRIPTEDMODULES_LIB_DIR of Slicer 5.10


def module_files(module_source: Path = MODULE_SOURCE) -> list[str]:
    """Module scripts and resources, relative to the module's source folder (= relative to the install folder)."""
    scripts = ["MedGMAESlicer.py"] + sorted(f"MedGMAESlicerLib/{p.name}"
                                            for p in (module_source / "MedGMAESlicerLib").glob("*.py"))
    resources = sorted(p.relative_to(module_source).as_posix() for p in (module_source / "Resources").rglob("*")
                       if p.is_file())
    return scripts + resources


def core_files(repo: Path = REPO) -> list[str]:
    """The bundled library, relative to the repository (= relative to the install folder)."""
    core = repo / "medgmae_core"
    files = [p for p in core.rglob("*.py")] + list((core / "weights").glob("*.pt")) + \
        list((core / "configs").glob("*.yaml"))
    return sorted(p.relative_to(repo).as_posix() for p in files)


def install_layout(prefix: Path) -> Path:
    """Lay the extension out below ``prefix`` as ``make install`` does; returns its qt-scripted-modules folder."""
    target = Path(prefix) / QTSCRIPTEDMODULES
    for rel in module_files():
        _copy(MODULE_SOURCE / rel, target / rel)
    for rel in core_files():
        _copy(REPO / rel, target / rel)
    return target


def layout_listing(folder: Path) -> list[str]:
    """Files below an installed qt-scripted-modules folder (byte-code caches left out)."""
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)
