"""Dependencies in Slicer's Python, checked at first use and installed only after asking.

What MedGMAE needs is ``Resources/requirements.txt`` (the bundled ``medgmae_core``'s dependencies; a test keeps it
equal to ``pyproject.toml``). Checking reads installed package metadata only: it never imports torch and never
fails because something is missing. Installing follows the Slicer AI extensions (SlicerTotalSegmentator,
SlicerMONAIAuto3DSeg):

1. one ``slicer.util.confirmOkCancelDisplay`` listing everything that will be installed;
2. torch through the PyTorch extension (``PyTorchUtilsLogic().installTorch(askConfirmation=False,
   torchVersionRequirement=...)``, which picks the CPU/CUDA build; the extension is a declared dependency,
   ``EXTENSION_DEPENDS PyTorch``);
3. the rest with ``slicer.packaging.pip_ensure`` (Slicer >= 5.12: progress dialog, pip in a separate process,
   restart prompt) or ``slicer.util.pip_install`` (Slicer 5.10), with a constraints file that pins Slicer's own
   numpy, SimpleITK and VTK (and the installed torch), so they are never replaced;
4. a restart prompt when a package that was already imported changed.

In testing mode (``slicer.app.testingEnabled()``) nothing is installed, as ``pip_ensure(skip_in_testing=True)``.
Everything that touches the application is in :class:`SlicerServices`, so tests inject fakes.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from . import RESOURCES_DIR
from .compat import translator

_ = translator()
log = logging.getLogger(__name__)

REQUIREMENTS_FILE = RESOURCES_DIR / "requirements.txt"
SLICER_PROVIDED = ("numpy", "SimpleITK", "vtk")  # shipped with Slicer: checked and pinned, never installed by us
CORE_PACKAGE = "medgmae_core"
REQUESTER = "MedGMAE"
PYTORCH_EXTENSION_HINT = _("torch comes from the PyTorch extension, which is not installed: install 'PyTorch' from "
                           "the Extensions Manager and restart Slicer")


class DependencyError(RuntimeError):
    """Something MedGMAE needs cannot be installed here; the message says what to do."""


class InstallCancelled(DependencyError):
    """The user declined the installation."""


def load_requirements(path: str | Path = REQUIREMENTS_FILE) -> list[str]:
    """Requirement lines of a requirements file, parsed by the rules of ``slicer.packaging.load_requirements``
    (Base/Python/slicer/packaging.py): comments, empty lines and pip options (lines starting with ``-``) are skipped."""
    lines = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and not line.startswith("-"):
            Requirement(line)  # invalid lines fail here, with their text
            lines.append(line)
    return lines


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def find_core() -> str | None:
    """Where ``medgmae_core`` would be imported from (the extension's bundled copy, or an installed package),
    without importing it; None when it is not there."""
    try:
        spec = importlib.util.find_spec(CORE_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(list(spec.submodule_search_locations)[0])


@dataclass
class RequirementStatus:
    requirement: str
    installed: str | None  # version, or None when missing
    satisfied: bool
    slicer_provided: bool = False

    @property
    def name(self) -> str:
        return Requirement(self.requirement).name

    def describe(self) -> str:
        if self.satisfied:
            return f"OK        {self.requirement} (installed {self.installed})"
        if self.slicer_provided:
            found = f"Slicer has {self.installed}" if self.installed else "not found"
            return f"SLICER    {self.requirement}: {found}; Slicer's own copy is kept (never replaced)"
        if self.installed is None:
            return f"MISSING   {self.requirement}"
        return f"UPGRADE   {self.requirement} (installed {self.installed})"


@dataclass
class DependencyReport:
    statuses: list[RequirementStatus]
    core_location: str | None
    pytorch_extension: bool = True
    installed: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    @property
    def missing(self) -> list[RequirementStatus]:
        """What install would fetch (Slicer's own packages are never fetched)."""
        return [s for s in self.statuses if not s.satisfied and not s.slicer_provided]

    @property
    def core_found(self) -> bool:
        return self.core_location is not None

    @property
    def ok(self) -> bool:
        return self.core_found and not self.missing

    def summary(self) -> str:
        """One message for the panel."""
        if self.ok:
            return _("All Python packages MedGMAE needs are installed.")
        parts = []
        if not self.core_found:
            parts.append(_("The MedGMAE library (medgmae_core) is missing from this installation: reinstall the "
                           "MedGMAE extension (developers: pip install -e the repository)."))
        if self.missing:
            names = ", ".join(s.name for s in self.missing)
            parts.append(_("MedGMAE needs Python packages that are not installed yet: {names}. Click 'Install "
                           "dependencies' in the Install section (needs an internet connection and a few minutes), or "
                           "just use a panel: you will be asked before anything is installed.").format(names=names))
            if not self.pytorch_extension and any(canonicalize_name(s.name) == "torch" for s in self.missing):
                parts.append(PYTORCH_EXTENSION_HINT + ".")
        return " ".join(parts)

    def details(self) -> str:
        core = f"OK        {CORE_PACKAGE} ({self.core_location})" if self.core_found else f"MISSING   {CORE_PACKAGE}"
        return "\n".join([core] + [s.describe() for s in self.statuses] + self.messages)

    def text(self) -> str:
        return self.summary() + "\n\n" + self.details()


class SlicerServices:
    """The application side of installing, through Slicer's own API (only inside the app).

    ``slicer`` is imported in the methods: the checks above run in any Python (``jobs.py`` and
    :func:`_default_services` look at ``sys.modules`` instead of importing it)."""

    def testing(self) -> bool:
        import slicer  # lazy: the application's API (see the class docstring)
        return bool(slicer.app.testingEnabled())

    def confirm(self, text: str, title: str, detail: str) -> bool:
        import slicer  # lazy: the application's API (see the class docstring)
        return bool(slicer.util.confirmOkCancelDisplay(text, title, detailedText=detail))

    def confirm_restart(self, text: str, detail: str) -> bool:
        import slicer  # lazy: the application's API (see the class docstring)
        return bool(slicer.util.confirmYesNoDisplay(text, _("{requester} - restart recommended").format(
            requester=REQUESTER), detailedText=detail))

    def restart(self) -> None:
        import slicer  # lazy: the application's API (see the class docstring)
        slicer.util.restart()

    def has_pytorch_extension(self) -> bool:
        return importlib.util.find_spec("PyTorchUtils") is not None

    def pytorch_utils(self):
        """``PyTorchUtilsLogic()`` of the PyTorch extension, or None when it is not installed."""
        try:
            import PyTorchUtils  # lazy: the PyTorch extension's module, present only when it is installed
        except ImportError:
            return None
        return PyTorchUtils.PyTorchUtilsLogic()

    def pip(self, requirements: list[str], constraints: Path) -> bool:
        """Install with Slicer's pip helpers; True when they already asked about restarting."""
        import slicer  # lazy: the application's API (see the class docstring)
        try:
            import slicer.packaging as packaging  # lazy: Slicer >= 5.12 only
        except ImportError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            packaging.pip_ensure(requirements, constraints=str(constraints), prompt_install=False,
                                 prompt_restart=True, requester=REQUESTER, skip_in_testing=True, show_progress=True)
            return True
        slicer.util.pip_install(["-c", str(constraints), *requirements])  # Slicer 5.10: pip in a process, log shown
        return False


class InstallLogic:
    """Check and install. ``version_of``, ``find_core`` and ``services`` are injectable (tests use fakes)."""

    def __init__(self, *, requirements: Iterable[str] | None = None,
                 version_of: Callable[[str], str | None] = installed_version,
                 find_core: Callable[[], str | None] = find_core, services=None,
                 log: Callable[[str], None] | None = None) -> None:
        self.requirements = list(requirements) if requirements is not None else load_requirements()
        self.version_of = version_of
        self.find_core = find_core
        self.services = services if services is not None else _default_services()
        self.log = log or (lambda message: None)

    # ------------------------------------------------------------------ check
    def torch_requirement(self) -> str:
        return next((r for r in self.requirements if _name(r) == "torch"), "torch")

    def check(self) -> DependencyReport:
        importlib.invalidate_caches()  # see what a pip process just installed
        statuses = [self._status(r) for r in self.requirements]
        pytorch_extension = self.services.has_pytorch_extension() if self.services is not None else False
        return DependencyReport(statuses, self.find_core(), pytorch_extension)

    def _status(self, requirement: str) -> RequirementStatus:
        try:
            req = Requirement(requirement)
        except InvalidRequirement as exc:
            raise ValueError(f"invalid requirement {requirement!r}: {exc}") from exc
        version = self.version_of(req.name)
        ok = version is not None and (not req.specifier or req.specifier.contains(version, prereleases=True))
        return RequirementStatus(requirement, version, ok, slicer_provided=_name(requirement) in _SLICER_NAMES)

    def constraints(self) -> list[str]:
        """``name==version`` pins for Slicer's own packages and the installed torch."""
        return [f"{n}=={v}" for n in (*SLICER_PROVIDED, "torch") if (v := self.version_of(n)) is not None]

    # ---------------------------------------------------------------- install
    def ensure(self) -> DependencyReport:
        """At first use: nothing to do when everything is there; otherwise ask, install, and re-check."""
        report = self.check()
        return report if report.ok else self.install(ask_confirmation=True)

    def install(self, *, ask_confirmation: bool = True) -> DependencyReport:
        """Install what is missing; returns the report after installing. Raises :class:`DependencyError`
        (or :class:`InstallCancelled`) with a message for the user when it cannot go on."""
        before = self.check()
        if before.ok:
            return before
        if not before.core_found:
            raise DependencyError(before.summary())
        services = self.services
        if services is None:
            names = " ".join(f'"{s.requirement}"' for s in before.missing)
            raise DependencyError(f"Install the missing packages into this Python ({sys.executable}): "
                                  f"{sys.executable} -m pip install {names}")
        if services.testing():  # as slicer.packaging.pip_ensure(skip_in_testing=True): never change the environment
            before.messages.append("Testing mode: nothing was installed.")
            log.info("Testing mode is enabled: skipping the installation of %s", [s.requirement for s in before.missing])
            return before
        missing = {_name(s.requirement): s for s in before.missing}
        torch_status = missing.pop("torch", None)
        torch_logic = services.pytorch_utils() if torch_status is not None else None
        if torch_status is not None and torch_logic is None:
            raise DependencyError(PYTORCH_EXTENSION_HINT + _(", then try again."))
        listing = "\n".join(f"- {s.requirement}" + (" (with the PyTorch extension)" if s is torch_status else "")
                            for s in before.missing)
        if ask_confirmation and not services.confirm(
                _("MedGMAE needs {count} Python packages that are not installed yet. Installing them changes "
                  "Slicer's Python environment, needs an internet connection and can take several minutes. "
                  "Install now?").format(count=len(before.missing)),
                _("{requester} - install Python packages").format(requester=REQUESTER), listing):
            raise InstallCancelled(_("Installation cancelled: MedGMAE cannot run until these packages are "
                                     "installed: {names}.").format(names=", ".join(s.name for s in before.missing)))
        installed, messages = [], []
        if torch_status is not None:
            spec = str(Requirement(torch_status.requirement).specifier)
            self.log(_("Installing PyTorch with the PyTorch extension (it can take several minutes)..."))
            if torch_logic.installTorch(askConfirmation=False, torchVersionRequirement=spec) is None:
                raise DependencyError(_("PyTorch was not installed (the PyTorch extension reported a failure); "
                                        "install it from the PyTorch Utils module and try again."))
            installed.append(torch_status.requirement)
            messages.append(f"torch installed with the PyTorch extension ({torch_status.requirement})")
        upgraded = [s.name for s in missing.values() if s.installed is not None]
        if missing:
            requirements = [s.requirement for s in missing.values()]
            self.log(_("Installing {names} with pip...").format(names=", ".join(s.name for s in missing.values())))
            restart_asked = services.pip(requirements, self._write_constraints())
            installed += requirements
            messages.append(f"installed with pip: {', '.join(requirements)} (kept: {', '.join(self.constraints())})")
            stale = [n for n in upgraded if _imported(n)]
            if stale and not restart_asked and services.confirm_restart(
                    _("Some updated packages were already loaded and may not work until Slicer restarts. "
                      "Restart now?"), "\n".join(stale)):
                services.restart()
        after = self.check()
        after.installed, after.messages = installed, messages + after.messages
        return after

    def _write_constraints(self) -> Path:
        path = Path(tempfile.gettempdir()) / "medgmae_slicer_constraints.txt"
        path.write_text("\n".join(self.constraints()) + "\n")
        return path


_SLICER_NAMES = {canonicalize_name(n) for n in SLICER_PROVIDED}


def _name(requirement: str) -> str:
    return canonicalize_name(Requirement(requirement).name)


def _imported(distribution: str) -> bool:
    """Whether a module of this distribution is already imported (then an upgrade needs a restart)."""
    names = {n for n, dists in importlib.metadata.packages_distributions().items()
             if canonicalize_name(distribution) in {canonicalize_name(d) for d in dists}}
    return any(n in sys.modules for n in names)


def _default_services():
    slicer = sys.modules.get("slicer")
    return SlicerServices() if slicer is not None and getattr(slicer, "app", None) is not None else None
