"""Dependencies in Slicer's Python: check torch and the medgmae_core requirements, install what is missing.

torch goes through the PyTorch extension (``PyTorchUtilsLogic().installTorch``) when it is installed, because
it picks the right CPU/CUDA build; everything else goes through ``slicer.pydeps.pip_ensure`` /
``slicer.packaging.pip_ensure`` (Slicer >= 5.11/5.12) or ``slicer.util.pip_install``. Slicer's own VTK,
SimpleITK and numpy are never replaced: they are pinned to the installed versions in a pip constraints file
and skipped. Every backend is injectable so the logic is tested with fakes.
"""
from __future__ import annotations

import importlib.metadata
import inspect
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

TORCH_REQUIREMENT = "torch>=2.2"
PROTECTED = ("vtk", "SimpleITK", "numpy")  # shipped with Slicer: pinned, never upgraded by us
CORE_DISTRIBUTION = "medgmae-core"
REPO_ROOT = Path(__file__).resolve().parents[2]  # MedGMAESlicer/MedGMAESlicerLib/install.py -> repository


@dataclass
class RequirementStatus:
    requirement: str
    installed: str | None  # version, or None when missing
    satisfied: bool
    protected: bool = False

    @property
    def name(self) -> str:
        return Requirement(self.requirement).name

    def describe(self) -> str:
        if self.satisfied:
            return f"OK       {self.requirement} (installed {self.installed})"
        if self.installed is None:
            return f"MISSING  {self.requirement}"
        if self.protected:
            return (f"CONFLICT {self.requirement}: Slicer ships {self.name} {self.installed}, which is kept "
                    f"(it is never replaced); the module may still work")
        return f"UPGRADE  {self.requirement} (installed {self.installed})"


@dataclass
class InstallReport:
    statuses: list[RequirementStatus]
    installed: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    @property
    def missing(self) -> list[RequirementStatus]:
        return [s for s in self.statuses if not s.satisfied and not (s.protected and s.installed is not None)]

    @property
    def ok(self) -> bool:
        return not self.missing

    def text(self) -> str:
        lines = [s.describe() for s in self.statuses] + self.messages
        lines.append("All dependencies are installed." if self.ok else
                     f"{len(self.missing)} missing: click 'Install missing' (needs internet) or install them by hand.")
        return "\n".join(lines)


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def core_requirements(pyproject: Path | None = None) -> list[str]:
    """medgmae_core's runtime requirements: from the source tree's pyproject.toml, else the installed metadata."""
    pyproject = pyproject or REPO_ROOT / "pyproject.toml"
    try:
        import tomllib  # Python >= 3.11 (Slicer >= 5.8)
    except ImportError:
        tomllib = None
    if pyproject.is_file() and tomllib is not None:
        with open(pyproject, "rb") as f:
            return list(tomllib.load(f)["project"]["dependencies"])
    requires = importlib.metadata.requires(CORE_DISTRIBUTION) or []
    return [r for r in requires if "extra ==" not in r]


class InstallLogic:
    """Check and install; ``version_of``, ``pytorch_utils``, ``pip_ensure`` and ``pip_install`` are injectable."""

    def __init__(self, *, requirements: Iterable[str] | None = None,
                 version_of: Callable[[str], str | None] = installed_version,
                 pytorch_utils=None, pip_ensure: Callable | None = None, pip_install: Callable | None = None,
                 core_source: str | None = None, log: Callable[[str], None] = print) -> None:
        self.requirements = list(requirements) if requirements is not None else core_requirements()
        self.version_of = version_of
        self.pytorch_utils = pytorch_utils if pytorch_utils is not None else _find_pytorch_utils()
        self.pip_ensure = pip_ensure if pip_ensure is not None else _find_pip_ensure()
        self.pip_install = pip_install if pip_install is not None else _find_pip_install()
        self.core_source = core_source
        self.log = log

    # ------------------------------------------------------------------ check
    def torch_requirement(self) -> str:
        torch_reqs = [r for r in self.requirements if _name(r) == "torch"]
        return torch_reqs[0] if torch_reqs else TORCH_REQUIREMENT

    def check(self) -> InstallReport:
        reqs = [self.torch_requirement()] + [r for r in self.requirements if _name(r) != "torch"]
        statuses = [self._status(r) for r in reqs]
        statuses.append(RequirementStatus(CORE_DISTRIBUTION, self.version_of(CORE_DISTRIBUTION),
                                          self.version_of(CORE_DISTRIBUTION) is not None))
        return InstallReport(statuses)

    def _status(self, requirement: str) -> RequirementStatus:
        try:
            req = Requirement(requirement)
        except InvalidRequirement as exc:
            raise ValueError(f"invalid requirement {requirement!r}: {exc}") from exc
        version = self.version_of(req.name)
        ok = version is not None and (not req.specifier or req.specifier.contains(version, prereleases=True))
        return RequirementStatus(requirement, version, ok, protected=_name(requirement) in _PROTECTED_NAMES)

    def constraints(self) -> list[str]:
        """``name==version`` pins for Slicer's own packages that are installed."""
        return [f"{n}=={v}" for n in PROTECTED if (v := self.version_of(n)) is not None]

    # ---------------------------------------------------------------- install
    def install(self, *, ask_confirmation: bool = False) -> InstallReport:
        """Install missing requirements; returns the report after installing (re-checked)."""
        before = self.check()
        installed, messages = [], []
        missing = {canonicalize_name(s.name): s for s in before.missing}
        if "torch" in missing:
            installed.append(self._install_torch(missing.pop("torch").requirement, ask_confirmation, messages))
        core_missing = missing.pop(canonicalize_name(CORE_DISTRIBUTION), None)
        pip_reqs = [s.requirement for s in missing.values()]
        if pip_reqs:
            self._pip(pip_reqs, messages)
            installed += pip_reqs
        if core_missing is not None:
            source = self.core_source or (str(REPO_ROOT) if (REPO_ROOT / "pyproject.toml").is_file() else CORE_DISTRIBUTION)
            self._pip([source], messages, no_deps=True)
            installed.append(source)
        for s in before.statuses:
            if s.protected and not s.satisfied and s.installed is not None:
                messages.append(s.describe())
        after = self.check()
        after.installed, after.messages = installed, messages
        return after

    def _install_torch(self, requirement: str, ask_confirmation: bool, messages: list[str]) -> str:
        spec = str(Requirement(requirement).specifier)
        if self.pytorch_utils is not None:
            self.log(f"Installing PyTorch ({requirement}) with the PyTorch extension...")
            result = self.pytorch_utils.installTorch(askConfirmation=ask_confirmation, torchVersionRequirement=spec)
            if result is None or result is False:
                raise RuntimeError("PyTorch was not installed (cancelled or failed in the PyTorch extension); "
                                   "install it from the PyTorch extension's module panel and try again")
            messages.append(f"torch installed with the PyTorch extension ({requirement})")
        else:
            messages.append("The PyTorch extension is not installed: installing the default torch build with pip "
                            "(install the 'PyTorch' extension for a CUDA build that matches your GPU)")
            self._pip([requirement], messages)
        return requirement

    def _pip(self, requirements: list[str], messages: list[str], no_deps: bool = False) -> None:
        constraints_path = self._write_constraints()
        self.log(f"Installing with pip: {' '.join(requirements)} (keeping {', '.join(self.constraints()) or 'nothing'})")
        if self.pip_ensure is not None and not no_deps:
            _call_supported(self.pip_ensure, [Requirement(r) for r in requirements], constraints=str(constraints_path),
                            skip_packages=[n for n in PROTECTED if self.version_of(n)] + ["torch"],
                            requester="MedGMAESlicer")
        elif self.pip_install is not None:
            args = ["-c", str(constraints_path)] + (["--no-deps"] if no_deps else []) + list(requirements)
            self.pip_install(_pip_args(args))
        else:
            raise RuntimeError(f"no pip installer available in this Python ({sys.executable}); install by hand: "
                               f"{sys.executable} -m pip install {' '.join(requirements)}")
        messages.append(f"installed {', '.join(requirements)}")

    def _write_constraints(self) -> Path:
        path = Path(tempfile.gettempdir()) / "medgmae_slicer_constraints.txt"
        path.write_text("\n".join(self.constraints()) + "\n")
        return path


_PROTECTED_NAMES = {canonicalize_name(n) for n in PROTECTED}


def _name(requirement: str) -> str:
    return canonicalize_name(Requirement(requirement).name)


def _pip_args(args: list[str]) -> str:
    import shlex
    return " ".join(shlex.quote(a) for a in args)


def _call_supported(fn: Callable, *args, **kwargs):
    """Call ``fn`` with only the keyword arguments its signature accepts (Slicer versions differ)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(*args, **kwargs)
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return fn(*args, **kwargs)
    return fn(*args, **{k: v for k, v in kwargs.items() if k in params})


def _find_pytorch_utils():
    """``PyTorchUtilsLogic()`` when the PyTorch extension is installed in the running Slicer, else None."""
    try:
        import slicer
        if not hasattr(slicer, "modules") or not hasattr(slicer.modules, "pytorchutils"):
            return None
        import PyTorchUtils
        return PyTorchUtils.PyTorchUtilsLogic()
    except ImportError:
        return None


def _find_pip_ensure():
    for module_name in ("slicer.pydeps", "slicer.packaging"):
        try:
            module = __import__(module_name, fromlist=["pip_ensure"])
        except ImportError:
            continue
        if hasattr(module, "pip_ensure"):
            return module.pip_ensure
    return None


def _find_pip_install():
    try:
        import slicer.util
        if hasattr(slicer, "app"):
            return slicer.util.pip_install
    except ImportError:
        pass
    return None
