"""The extension as ``make install`` lays it out, run in a Python that has no torch, no MONAI and no medgmae.

- ``install_layout()`` (a Python mirror of the CMake install) lists exactly what ``MedGMAESlicer/CMakeLists.txt``
  lists and globs, and exactly what a real CMake configure + build + install of the extension produces (with
  ``cmake_slicer_stub/`` standing in for Slicer's build tree);
- in that layout, with only Slicer's own packages importable, the module imports, ``setup()`` completes, the
  missing dependencies are reported in one message, first use asks once, testing mode installs nothing, the
  module's self-test passes, and nothing crashes;
- the requirements shipped in Resources are the library's, and the minimum Python is the library's.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from install_layout import (MODULE_SOURCE, QTSCRIPTEDMODULES, REPO, core_files, install_layout, layout_listing,
                            module_files)

HERE = Path(__file__).resolve().parent
CMAKE = shutil.which("cmake")

# Distributions Slicer does not ship: hidden from the restricted Python (their code and their metadata).
NOT_IN_SLICER = ("torch", "functorch", "torchgen", "nvidia", "triton", "monai", "numba", "llvmlite", "einops",
                 "nibabel", "h5py", "scipy", "matplotlib", "mpl_toolkits", "yaml", "_yaml", "pyyaml", "tqdm",
                 "medgmae", "__editable__", "pyside6", "shiboken6", "pytest", "_pytest")


# ----------------------------------------------------------------------------- the layout
def _cmake_lists():
    text = (MODULE_SOURCE / "CMakeLists.txt").read_text()

    def listed(var):
        body = re.search(rf"set\({var}\s+(.*?)\)", text, re.S).group(1)
        return [line.strip().replace("${MODULE_NAME}", "MedGMAESlicer") for line in body.splitlines() if line.strip()]

    def globs(var):
        body = re.search(rf"file\((GLOB_RECURSE|GLOB) {var} CONFIGURE_DEPENDS RELATIVE \S+\s+(.*?)\)", text, re.S)
        patterns = [p.strip().replace("${MEDGMAE_CORE_SOURCE_DIR}/", "") for p in body.group(2).split()]
        return body.group(1), patterns
    return listed("MODULE_PYTHON_SCRIPTS"), listed("MODULE_PYTHON_RESOURCES"), globs("MEDGMAE_CORE_SCRIPTS"), \
        globs("MEDGMAE_CORE_RESOURCES")


def _expand(kind, patterns):
    """CMake's file(GLOB) / file(GLOB_RECURSE) for patterns like ``dir/*.ext``."""
    found = set()
    for pattern in patterns:
        folder, name = pattern.rsplit("/", 1)
        paths = (REPO / folder).rglob(name) if kind == "GLOB_RECURSE" else (REPO / folder).glob(name)
        found |= {p.relative_to(REPO).as_posix() for p in paths if p.is_file()}
    return found


def test_layout_function_matches_the_cmake_lists():
    scripts, resources, (core_kind, core_patterns), (res_kind, res_patterns) = _cmake_lists()
    assert set(scripts) | set(resources) == set(module_files()), "CMakeLists and install_layout list other files"
    assert len(scripts) == len(set(scripts)) and "MedGMAESlicerLib/prediction.py" in scripts
    assert core_kind == "GLOB_RECURSE" and core_patterns == ["medgmae_core/*.py"]
    assert res_kind == "GLOB" and sorted(res_patterns) == ["medgmae_core/configs/*.yaml", "medgmae_core/weights/*.pt"]
    assert _expand(core_kind, core_patterns) | _expand(res_kind, res_patterns) == set(core_files())
    weights = [f for f in core_files() if f.startswith("medgmae_core/weights/")]
    assert weights and all(f.endswith(".pt") for f in weights)  # whatever the bundled weights are called


def test_every_library_file_is_in_the_cmake_lists():
    """A new file in MedGMAESlicerLib or Resources must be added to the CMakeLists (Slicer installs only what
    is listed), and the developer Reload must know it."""
    scripts, resources, *_ = _cmake_lists()
    on_disk = {f"MedGMAESlicerLib/{p.name}" for p in (MODULE_SOURCE / "MedGMAESlicerLib").glob("*.py")}
    assert on_disk <= set(scripts), on_disk - set(scripts)
    assert {p.relative_to(MODULE_SOURCE).as_posix() for p in (MODULE_SOURCE / "Resources").rglob("*")
            if p.is_file()} == set(resources)
    sys.path.insert(0, str(MODULE_SOURCE))
    from MedGMAESlicerLib import SUBMODULES
    assert {f"MedGMAESlicerLib/{m}.py" for m in SUBMODULES} | {"MedGMAESlicerLib/__init__.py"} == on_disk


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """The installed layout: from a real CMake build + install when cmake is there, else from install_layout()."""
    root = tmp_path_factory.mktemp("layout")
    mirrored = install_layout(root / "mirror")
    if CMAKE is None:
        return mirrored, None
    build, prefix = root / "build", root / "install"
    stub = HERE / "cmake_slicer_stub"
    for argv in ([CMAKE, "-S", str(REPO), "-B", str(build), f"-DSlicer_DIR={stub}", "-DBUILD_TESTING=OFF"],
                 [CMAKE, "--build", str(build)], [CMAKE, "--install", str(build), "--prefix", str(prefix)]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return mirrored, prefix / QTSCRIPTEDMODULES


def test_cmake_install_lays_out_what_the_function_lays_out(layout):
    mirrored, installed = layout
    if installed is None:
        pytest.skip("cmake is not installed")
    listing = layout_listing(installed)
    assert listing == layout_listing(mirrored)
    assert {"MedGMAESlicer.py", "MedGMAESlicerLib/panel.py", "Resources/UI/MedGMAESlicer.ui",
            "Resources/Icons/MedGMAESlicer.png", "Resources/requirements.txt", "medgmae_core/__init__.py",
            "medgmae_core/inference.py"} <= set(listing)
    assert any(f.startswith("medgmae_core/weights/") and f.endswith(".pt") for f in listing)
    for rel in listing:  # byte for byte the sources
        source = MODULE_SOURCE / rel if not rel.startswith("medgmae_core/") else REPO / rel
        assert (installed / rel).read_bytes() == source.read_bytes(), rel


def test_cmake_refuses_slicer_older_than_5_10(tmp_path):
    if CMAKE is None:
        pytest.skip("cmake is not installed")
    done = subprocess.run([CMAKE, "-S", str(REPO), "-B", str(tmp_path / "b"),
                           f"-DSlicer_DIR={HERE / 'cmake_slicer_stub'}", "-DSTUB_SLICER_VERSION_MINOR=8"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "needs 3D Slicer 5.10 or newer" in done.stderr


# ----------------------------------------------------------------------------- a Python without the dependencies
def _slicer_only_site(target: Path) -> Path:
    """This environment's site-packages without what Slicer does not ship (links, no copies)."""
    import numpy
    site = Path(numpy.__file__).resolve().parents[1]
    target.mkdir()
    for entry in site.iterdir():
        lowered = entry.name.lower()
        if lowered.endswith(".pth") or any(lowered.startswith(prefix) for prefix in NOT_IN_SLICER):
            continue
        (target / entry.name).symlink_to(entry)
    return target


def test_installed_module_without_dependencies(layout, tmp_path):
    mirrored, installed = layout
    folder = installed or mirrored
    site = _slicer_only_site(tmp_path / "site")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(QT_QPA_PLATFORM="offscreen", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-S", "-s", str(HERE / "installed_module_driver.py"), str(folder),
                           str(site), str(HERE), str(HERE / "standin_extensions")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + "\n" + done.stderr[-6000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("REPORT "))
    r = json.loads(line[len("REPORT "):])

    # the environment: no torch, MONAI, numba, nibabel, einops, no installed medgmae; the bundled library is there
    for name in ("torch", "monai", "numba", "nibabel", "einops"):
        assert not r[f"{name}_spec"] and not r[f"{name}_metadata"], name
    assert not r["medgmae_core_installed"]
    assert Path(r["medgmae_core_location"]) == folder / "medgmae_core"
    assert Path(r["module_file"]) == folder / "MedGMAESlicer.py"

    # the module imports and setup() completes: panel, parameter node, poll timer
    assert r["unsupported"] is None and r["parameter_node"] and r["job_timer_active"]
    assert r["checkpoint_field"] == "" and r["window_mode_items"] == ["One window around the point", "Whole volume"]
    # the missing dependencies in one message, shown at the top and in the expanded Install section
    message = r["dependency_message"]
    assert r["dependency_message_visible"] and r["install_panel_expanded"] and r["install_status"] == message
    assert message.count("MedGMAE needs Python packages that are not installed yet") == 1
    for name in ("torch", "monai", "numba", "einops", "nibabel"):
        assert name in message
    assert "numpy" not in message and "SimpleITK" not in message  # Slicer's own, never installed
    assert r["modules_imported"] == []  # opening the module imported no torch, MONAI, numba or medgmae_core

    # first use: one question listing everything, declined: nothing installed, one sentence says so
    assert r["preview_enabled"]
    assert len(r["dialogs"]) == 1
    dialog = r["dialogs"][0]
    assert "Install now?" in dialog["text"] and "torch" in dialog["detail"] and "monai" in dialog["detail"]
    assert "(with the PyTorch extension)" in dialog["detail"]
    assert r["preview_message"].startswith("Installation cancelled") and r["torch_install_calls"] == []

    # testing mode (CTest on the extension factory): nothing asked, nothing installed, nothing started
    assert r["dialogs_after_predict"] == 1 and not r["predict_started"]
    assert "not installed yet" in r["predict_message"]
    # the module's self-test passes with the dependency-free part
    messages = r["self_test_messages"]
    assert "Running only the self-tests that need no dependencies" in messages[0]
    assert "parameters round trip OK" in messages and messages[-1] == "MedGMAE self-tests passed"
    assert any(m.startswith("background job") for m in messages)
    # closing the scene and the module: no crash, timer stopped, still nothing heavy imported
    assert r["job_timer_after_cleanup"] is False and r["modules_imported_at_end"] == []


def test_developer_adding_only_the_module_path_gets_the_repositorys_library(tmp_path):
    """Developers add MedGMAESlicer/ to Slicer's module paths and nothing else: the library next to it is found
    (without torch installed, and without importing it)."""
    site = _slicer_only_site(tmp_path / "site")
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
            "import MedGMAESlicerLib\n"
            "from MedGMAESlicerLib.install import find_core\n"
            "print(find_core()); print(sorted(m for m in sys.modules if m.startswith(('torch', 'medgmae_core'))))")
    done = subprocess.run([sys.executable, "-S", "-s", "-c", code, str(site), str(MODULE_SOURCE)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    location, imported = done.stdout.splitlines()
    assert Path(location) == REPO / "medgmae_core" and imported == "[]"


# ----------------------------------------------------------------------------- what the extension states
def _pyproject():
    import tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_shipped_requirements_are_the_librarys():
    sys.path.insert(0, str(MODULE_SOURCE))
    from MedGMAESlicerLib.install import REQUIREMENTS_FILE, load_requirements
    assert REQUIREMENTS_FILE == MODULE_SOURCE / "Resources" / "requirements.txt"
    assert load_requirements() == _pyproject()["dependencies"]


def test_minimum_python_and_slicer_are_stated_consistently():
    sys.path.insert(0, str(MODULE_SOURCE))
    from MedGMAESlicerLib.compat import MIN_PYTHON, MIN_SLICER
    assert _pyproject()["requires-python"] == ">=%d.%d" % MIN_PYTHON
    assert MIN_SLICER == (5, 10)
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert "set(MedGMAESlicer_MINIMUM_SLICER_VERSION 5.10)" in cmake and 'EXTENSION_DEPENDS "PyTorch"' in cmake
    # utf-8 explicitly: after a DICOM series read (SimpleITK/GDCM) earlier in the suite the process locale is C
    readme = "".join((folder / "README.md").read_text(encoding="utf-8") for folder in (REPO, MODULE_SOURCE))
    assert "3D Slicer 5.10" in readme
