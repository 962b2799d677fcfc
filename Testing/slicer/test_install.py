"""Install logic with injected fakes: what is checked, which installer runs, and that Slicer's packages stay."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedGMAESlicer"))

from MedGMAESlicerLib.install import InstallLogic, core_requirements  # noqa: E402

REQS = ["torch>=2.2,<=2.13.0", "numpy>=1.22,<2.6", "SimpleITK>=2.2", "monai>=1.3", "nibabel>=5.0"]


class FakeEnv:
    """Installed versions; installers 'install' by updating it and record their calls."""

    def __init__(self, versions):
        self.versions = dict(versions)
        self.calls = []

    def version_of(self, name):
        return self.versions.get(name)


class FakePyTorchUtils:
    def __init__(self, env, result=True):
        self.env, self.result = env, result

    def installTorch(self, askConfirmation, torchVersionRequirement):
        self.env.calls.append(("installTorch", askConfirmation, torchVersionRequirement))
        if self.result:
            self.env.versions["torch"] = "2.5.1"
        return self.result


def fake_pip_ensure(env):
    def pip_ensure(requirements, constraints=None, skip_packages=None, requester=None):
        env.calls.append(("pip_ensure", [str(r) for r in requirements], Path(constraints).read_text().split(),
                          skip_packages, requester))
        for r in requirements:
            env.versions[r.name] = "99.0"
    return pip_ensure


def fake_pip_install(env):
    def pip_install(args: str):
        env.calls.append(("pip_install", args))
        for token in shlex.split(args):
            if token[0].isalpha() and "==" not in token:
                env.versions[token.split(">")[0].split("=")[0]] = "2.5.0"
            elif token.startswith("/"):
                env.versions["medgmae-core"] = "0.1.0"
    return pip_install


def test_check_reports_missing_and_protected():
    env = FakeEnv({"numpy": "1.26.4", "SimpleITK": "2.1.0", "nibabel": "5.2.0", "medgmae-core": "0.1.0"})
    logic = InstallLogic(requirements=REQS, version_of=env.version_of, pytorch_utils=None,
                         pip_ensure=None, pip_install=None, log=lambda m: None)
    report = logic.check()
    by_name = {s.name: s for s in report.statuses}
    assert not by_name["torch"].satisfied and by_name["torch"].installed is None
    assert not by_name["monai"].satisfied
    assert by_name["numpy"].satisfied and by_name["nibabel"].satisfied
    # Slicer's SimpleITK is too old for the spec, but it is protected: reported, not "missing".
    assert by_name["SimpleITK"].protected and not by_name["SimpleITK"].satisfied
    assert sorted(s.name for s in report.missing) == ["monai", "torch"]
    assert "CONFLICT SimpleITK" in report.text() and "MISSING  torch" in report.text()
    assert sorted(logic.constraints()) == ["SimpleITK==2.1.0", "numpy==1.26.4"]


def test_install_uses_pytorch_utils_then_pip_ensure_with_pins():
    env = FakeEnv({"numpy": "1.26.4", "SimpleITK": "2.3.1", "vtk": "9.4.2", "nibabel": "5.2.0", "medgmae-core": "0.1.0"})
    logic = InstallLogic(requirements=REQS, version_of=env.version_of, pytorch_utils=FakePyTorchUtils(env),
                         pip_ensure=fake_pip_ensure(env), pip_install=None, log=lambda m: None)
    report = logic.install(ask_confirmation=True)
    assert report.ok, report.text()
    assert env.calls[0] == ("installTorch", True, "<=2.13.0,>=2.2")
    kind, reqs, pins, skipped, requester = env.calls[1]
    assert kind == "pip_ensure" and reqs == ["monai>=1.3"] and requester == "MedGMAESlicer"
    assert sorted(pins) == ["SimpleITK==2.3.1", "numpy==1.26.4", "vtk==9.4.2"]
    assert set(skipped) >= {"vtk", "SimpleITK", "numpy", "torch"}
    # Slicer's own packages were not touched.
    assert (env.versions["numpy"], env.versions["SimpleITK"], env.versions["vtk"]) == ("1.26.4", "2.3.1", "9.4.2")


def test_install_without_pytorch_extension_falls_back_to_pip_install():
    env = FakeEnv({"numpy": "1.26.4", "SimpleITK": "2.3.1", "monai": "1.4.0", "nibabel": "5.2.0"})
    logic = InstallLogic(requirements=REQS, version_of=env.version_of, pytorch_utils=None, pip_ensure=None,
                         pip_install=fake_pip_install(env), core_source="/src/medgmae", log=lambda m: None)
    report = logic.install()
    assert report.ok, report.text()
    pip_calls = [c[1] for c in env.calls if c[0] == "pip_install"]
    assert pip_calls[0].startswith("-c ") and pip_calls[0].endswith("'torch>=2.2,<=2.13.0'")
    assert pip_calls[1].endswith("--no-deps /src/medgmae")
    assert any("PyTorch extension is not installed" in m for m in report.messages)


def test_cancelled_torch_install_is_a_clear_error():
    env = FakeEnv({"numpy": "1.26.4"})
    logic = InstallLogic(requirements=["torch>=2.2"], version_of=env.version_of,
                         pytorch_utils=FakePyTorchUtils(env, result=False), pip_ensure=None, pip_install=None,
                         log=lambda m: None)
    with pytest.raises(RuntimeError, match="PyTorch was not installed"):
        logic.install()


def test_no_installer_names_the_command():
    env = FakeEnv({})
    logic = InstallLogic(requirements=["monai>=1.3", "torch>=2.2"], version_of=env.version_of,
                         pytorch_utils=FakePyTorchUtils(env), pip_ensure=None, pip_install=None, log=lambda m: None)
    with pytest.raises(RuntimeError, match="-m pip install monai>=1.3"):
        logic.install()


def test_core_requirements_come_from_pyproject(repo_root):
    reqs = core_requirements(repo_root / "pyproject.toml")
    assert any(r.startswith("torch") for r in reqs) and any(r.startswith("monai") for r in reqs)
    # on this machine everything the library needs is installed
    report = InstallLogic(requirements=reqs, pytorch_utils=None, pip_ensure=None, pip_install=None).check()
    assert report.ok, report.text()
