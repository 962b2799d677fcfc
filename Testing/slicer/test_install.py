"""Install logic with injected fakes: what is checked, what is asked, which installer runs, what Slicer keeps.

The fake services answer like the real ones (MedGMAESlicerLib.install.SlicerServices): ``confirm`` is
``slicer.util.confirmOkCancelDisplay``, ``pytorch_utils`` is ``PyTorchUtilsLogic()`` of the PyTorch extension (whose
``installTorch`` returns the torch module or None), ``pip`` is ``slicer.packaging.pip_ensure`` /
``slicer.util.pip_install`` (it raises ``CalledProcessError`` when pip fails).
"""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedGMAESlicer"))

from MedGMAESlicerLib.install import (DependencyError, InstallCancelled, InstallLogic, find_core,  # noqa: E402
                                      installed_version, load_requirements)

REQS = ["torch>=2.2,<=2.13.0", "numpy>=1.22,<2.6", "SimpleITK>=2.2", "monai>=1.3", "nibabel>=5.0"]


class FakeEnv:
    """Installed versions; installers 'install' by updating it and record their calls."""

    def __init__(self, versions):
        self.versions = dict(versions)
        self.calls = []

    def version_of(self, name):
        return self.versions.get(name)


class FakeTorchLogic:
    def __init__(self, env, ok=True):
        self.env, self.ok = env, ok

    def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                     torchvisionVersionRequirement=None):
        self.env.calls.append(("installTorch", askConfirmation, torchVersionRequirement))
        if not self.ok:
            return None
        self.env.versions["torch"] = "2.5.1"
        return object()  # the torch module


class FakeServices:
    def __init__(self, env, *, answer=True, testing=False, torch_ok=True, pytorch_extension=True, pip_fails=False,
                 restart_answer=False, asks_restart=False):
        self.env, self.answer, self.is_testing = env, answer, testing
        self.torch = FakeTorchLogic(env, torch_ok) if pytorch_extension else None
        self.pip_fails, self.restart_answer, self.asks_restart = pip_fails, restart_answer, asks_restart
        self.questions, self.restarts = [], 0

    def testing(self):
        return self.is_testing

    def confirm(self, text, title, detail):
        self.questions.append((text, title, detail))
        return self.answer

    def confirm_restart(self, text, detail):
        self.questions.append((text, "restart", detail))
        return self.restart_answer

    def restart(self):
        self.restarts += 1

    def has_pytorch_extension(self):
        return self.torch is not None

    def pytorch_utils(self):
        return self.torch

    def pip(self, requirements, constraints):
        self.env.calls.append(("pip", list(requirements), Path(constraints).read_text().split()))
        if self.pip_fails:
            raise subprocess.CalledProcessError(1, "pip install")
        for r in requirements:
            self.env.versions[r.split(">")[0].split("=")[0].split("<")[0]] = "99.0"
        return self.asks_restart


def _logic(env, services, reqs=REQS, core="/ext/qt-scripted-modules/medgmae_core"):
    return InstallLogic(requirements=reqs, version_of=env.version_of, find_core=lambda: core, services=services)


def test_check_reports_missing_in_one_message_and_keeps_slicers_packages():
    env = FakeEnv({"numpy": "1.26.4", "SimpleITK": "2.1.0", "nibabel": "5.2.0"})
    report = _logic(env, FakeServices(env)).check()
    by_name = {s.name: s for s in report.statuses}
    assert not by_name["torch"].satisfied and by_name["torch"].installed is None
    assert by_name["numpy"].satisfied and by_name["nibabel"].satisfied
    # Slicer's SimpleITK is older than the spec, but it is Slicer's: reported, never "missing"
    assert by_name["SimpleITK"].slicer_provided and not by_name["SimpleITK"].satisfied
    assert sorted(s.name for s in report.missing) == ["monai", "torch"] and not report.ok
    summary = report.summary()
    assert summary.count("not installed yet: torch, monai.") == 1 and "SimpleITK" not in summary
    assert "SLICER    SimpleITK>=2.2: Slicer has 2.1.0" in report.details() and "MISSING   torch" in report.details()


def test_no_pytorch_extension_is_said_and_refused():
    env = FakeEnv({"numpy": "1.26.4", "SimpleITK": "2.3.1", "nibabel": "5.2.0", "monai": "1.4.0"})
    services = FakeServices(env, pytorch_extension=False)
    logic = _logic(env, services)
    assert "install 'PyTorch' from the Extensions Manager" in logic.check().summary()
    with pytest.raises(DependencyError, match="PyTorch extension, which is not installed"):
        logic.install()
    assert services.questions == [] and env.calls == []  # nothing asked or installed that cannot finish


def test_missing_core_is_a_reinstall_message():
    env = FakeEnv({"torch": "2.5.1", "numpy": "1.26.4", "SimpleITK": "2.3.1", "monai": "1.4", "nibabel": "5.2"})
    logic = _logic(env, FakeServices(env), core=None)
    report = logic.check()
    assert not report.ok and report.missing == []
    assert "reinstall the MedGMAE extension" in report.summary()
    with pytest.raises(DependencyError, match="reinstall the MedGMAE extension"):
        logic.install()


def test_install_asks_once_then_torch_through_the_extension_then_pip_with_pins():
    env = FakeEnv({"numpy": "1.26.4", "SimpleITK": "2.3.1", "vtk": "9.4.2", "nibabel": "5.2.0"})
    services = FakeServices(env)
    report = _logic(env, services).ensure()
    assert report.ok, report.text()
    assert len(services.questions) == 1
    text, title, detail = services.questions[0]
    assert "2 Python packages" in text and title == "MedGMAE - install Python packages"
    assert detail.splitlines() == ["- torch>=2.2,<=2.13.0 (with the PyTorch extension)", "- monai>=1.3"]
    assert env.calls[0] == ("installTorch", False, "<=2.13.0,>=2.2")  # asked already: the extension must not ask
    kind, reqs, pins = env.calls[1]
    assert kind == "pip" and reqs == ["monai>=1.3"]
    assert sorted(pins) == ["SimpleITK==2.3.1", "numpy==1.26.4", "torch==2.5.1", "vtk==9.4.2"]
    # Slicer's own packages were not touched
    assert (env.versions["numpy"], env.versions["SimpleITK"], env.versions["vtk"]) == ("1.26.4", "2.3.1", "9.4.2")
    assert report.installed == ["torch>=2.2,<=2.13.0", "monai>=1.3"]


def test_declined_installs_nothing():
    env = FakeEnv({"numpy": "1.26.4"})
    services = FakeServices(env, answer=False)
    with pytest.raises(InstallCancelled, match="Installation cancelled.*torch, monai, nibabel"):
        _logic(env, services).ensure()
    assert env.calls == []


def test_testing_mode_installs_nothing_and_asks_nothing():
    """As ``slicer.packaging.pip_ensure(skip_in_testing=True)``: CTest must not change Slicer's Python."""
    env = FakeEnv({"numpy": "1.26.4"})
    services = FakeServices(env, testing=True)
    report = _logic(env, services).ensure()
    assert not report.ok and services.questions == [] and env.calls == []
    assert "Testing mode: nothing was installed." in report.details()


def test_failed_torch_install_and_failed_pip_are_errors():
    env = FakeEnv({"numpy": "1.26.4"})
    with pytest.raises(DependencyError, match="PyTorch was not installed"):
        _logic(env, FakeServices(env, torch_ok=False)).install()
    env = FakeEnv({"numpy": "1.26.4", "torch": "2.5.1"})
    with pytest.raises(subprocess.CalledProcessError):
        _logic(env, FakeServices(env, pip_fails=True)).install()


def test_restart_is_offered_when_an_imported_package_was_upgraded(monkeypatch):
    """``pytest`` is imported in this process; upgrading it would need a restart (the 5.10 path asks itself; on
    5.12+ ``pip_ensure`` asks, and then MedGMAE does not ask again)."""
    env = FakeEnv({"numpy": "1.26.4", "torch": "2.5.1", "pytest": "1.0"})
    services = FakeServices(env, restart_answer=True)
    _logic(env, services, reqs=["torch>=2.2", "pytest>=8"]).install()
    assert services.questions[-1][1] == "restart" and "pytest" in services.questions[-1][2]
    assert services.restarts == 1
    env = FakeEnv({"numpy": "1.26.4", "torch": "2.5.1", "pytest": "1.0"})
    services = FakeServices(env, restart_answer=True, asks_restart=True)
    _logic(env, services, reqs=["torch>=2.2", "pytest>=8"]).install()
    assert [q for q in services.questions if q[1] == "restart"] == [] and services.restarts == 0


def test_outside_slicer_the_message_names_the_pip_command():
    env = FakeEnv({})
    logic = InstallLogic(requirements=["monai>=1.3"], version_of=env.version_of, find_core=lambda: "/x",
                         services=None)
    assert logic.services is None  # no slicer.app in this process
    with pytest.raises(DependencyError, match=r'-m pip install "monai>=1.3"'):
        logic.install()


def test_check_reads_metadata_only_and_finds_the_library_here(repo_root):
    """In this environment everything is installed; checking imported nothing new."""
    before = set(sys.modules)
    report = InstallLogic(services=None).check()
    assert report.ok, report.text()
    assert Path(find_core()) == repo_root / "medgmae_core"
    assert not {m for m in set(sys.modules) - before if m.split(".")[0] in ("torch", "monai", "numba")}
    assert installed_version("no-such-distribution-medgmae") is None
    assert load_requirements()[0].startswith("torch")


def test_requirements_file_rules(tmp_path):
    """``slicer.packaging.load_requirements`` rules: comments, blanks and pip options are skipped."""
    path = tmp_path / "requirements.txt"
    path.write_text("# a comment\n\n--index-url https://example.invalid\nmonai>=1.3\n  tqdm>=4.60  \n")
    assert load_requirements(path) == ["monai>=1.3", "tqdm>=4.60"]
    path.write_text("not a requirement !!\n")
    with pytest.raises(Exception):
        load_requirements(path)


def test_slicer_services_use_slicers_installers(monkeypatch, tmp_path):
    """The real services call Slicer's functions with the arguments Slicer documents: ``pip_ensure`` on 5.12+
    (Base/Python/slicer/packaging.py), ``pip_install(list)`` on 5.10 (Base/Python/slicer/util.py)."""
    import types

    import slicer

    from MedGMAESlicerLib.install import SlicerServices

    calls = []
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(testingEnabled=lambda: False), raising=False)
    monkeypatch.setattr(slicer.util, "pip_install", lambda args: calls.append(("pip_install", args)))
    constraints = tmp_path / "c.txt"
    assert SlicerServices().pip(["monai>=1.3"], constraints) is False  # 5.10: no slicer.packaging
    assert calls == [("pip_install", ["-c", str(constraints), "monai>=1.3"])]

    packaging = types.ModuleType("slicer.packaging")
    packaging.pip_ensure = lambda requirements, **kwargs: calls.append(("pip_ensure", requirements, kwargs))
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    monkeypatch.setattr(slicer, "packaging", packaging, raising=False)
    assert SlicerServices().pip(["monai>=1.3"], constraints) is True
    kind, reqs, kwargs = calls[-1]
    assert kind == "pip_ensure" and reqs == ["monai>=1.3"]
    assert kwargs == {"constraints": str(constraints), "prompt_install": False, "prompt_restart": True,
                      "requester": "MedGMAE", "skip_in_testing": True, "show_progress": True}
    assert importlib.metadata.version("packaging")  # the requirement parser Slicer ships
