"""User-facing errors and the command's temporary files: what ``cli.main`` needs to fail cleanly.

Every ``medgmae`` command fails the same way (``cli.main`` is the one place that does it): one line on stderr
naming the file or parameter, a JSON ``error`` event when ``--progress-json`` is on, the command's temporary
files removed, exit code 2. This module holds the pieces:

* :class:`UserError` and its kinds (``InputError``, ``SizeLimitError``, ``NoUsableInputError``, ``OutputError``):
  raised with a message that already names the file or parameter. ``InputError`` is also a ``ValueError``, so
  code (and tests) that catch ``ValueError`` keep working;
* :func:`user_message`: the one-line message for a user error, including ``ValueError``/``FileNotFoundError``,
  file-system errors (disk full, read-only, permission, not a folder) and torch's write failures;
* a registry of the running command's temporary files and folders (:func:`track_temp`, :func:`atomic_path`,
  :class:`StagedOutputs`, :func:`make_output_dir`) that :func:`cleanup_command` removes on failure;
* :func:`remove_stale_temp_files`: temporary files left by a killed process (``.NAME.<pid>.tmp...``).
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input, settings or environment: printed as one line, exit code 2."""


class InputError(UserError, ValueError):
    """A bad input file or parameter; the message names it."""


class SizeLimitError(InputError):
    """The work would exceed the size limit (``--max-voxels``) or the memory available."""


class NoUsableInputError(InputError, RuntimeError):
    """None of the inputs of a run could be used (each is named with its reason)."""


class OutputError(UserError, OSError):
    """An output could not be written (disk full, read-only, permission); the message names the path.

    Raised as ``OutputError(errno, message, path)``; ``str()`` is the message."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


# ------------------------------------------------------------------ messages
_OS_REASONS = {
    errno.ENOSPC: "disk full (no space left on device)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a parent of this path is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.EEXIST: "already exists",
    errno.ENOENT: "not found",
    errno.ENAMETOOLONG: "file name too long",
    errno.EIO: "input/output error",
}
_TORCH_WRITE_FAILURE = re.compile(r"unexpected pos|file write failed|PytorchStreamWriter failed", re.I)
_ALLOC_FAILURE = re.compile(r"can't allocate memory|DefaultCPUAllocator|out of memory", re.I)


def os_error_reason(exc: OSError) -> str:
    """The reason of an ``OSError`` in words ("disk full (no space left on device)", ...)."""
    return _OS_REASONS.get(exc.errno or -1) or exc.strerror or str(exc) or type(exc).__name__


def os_error_message(exc: OSError) -> str:
    """``OSError`` -> ``"cannot write PATH: disk full (no space left on device)"``-style text."""
    if isinstance(exc, OutputError):
        return str(exc)
    path = exc.filename or ""
    if exc.filename2:
        path = f"{path} -> {exc.filename2}"
    reason = os_error_reason(exc)
    if isinstance(exc, FileNotFoundError) and not path:
        return str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR):
        return f"cannot write {path}: {reason}" if path else reason
    return f"{path}: {reason}" if path else reason


def first_line(text: str) -> str:
    """One line of an exception text; DataLoader worker wrappers ('Original Traceback ...') give their last line."""
    text = str(text).strip()
    if "Original Traceback" in text or text.startswith("Traceback"):
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        last = lines[-1] if lines else text
        return re.sub(r"^[\w.]+(Error|Exception): ", "", last)
    return " ".join(ln.strip() for ln in text.splitlines() if ln.strip())


def root_cause(exc: BaseException) -> BaseException:
    """Unwrap MONAI's ``RuntimeError('applying transform ...')`` and similar chained wrappers."""
    seen = set()
    while (id(exc) not in seen and isinstance(exc.__cause__, Exception) and isinstance(exc, RuntimeError)
           and not isinstance(exc, UserError)):
        seen.add(id(exc))
        exc = exc.__cause__
    return exc


def user_message(exc: BaseException) -> str | None:
    """The one-line message if ``exc`` is a user error (bad input, settings, files, memory), else None.
    Temporary paths in it are replaced by the outputs they stand for."""
    message = _user_message(exc)
    return None if message is None else final_names(message)


def _user_message(exc: BaseException) -> str | None:
    exc = root_cause(exc)
    if isinstance(exc, UserError) and not isinstance(exc, OSError):
        return first_line(str(exc))
    if isinstance(exc, OutputError):
        return first_line(str(exc))
    if isinstance(exc, OSError):
        return first_line(os_error_message(exc))
    if isinstance(exc, ValueError) and not isinstance(exc, UnicodeError):
        return first_line(str(exc))
    if isinstance(exc, UnicodeError):
        return first_line(f"cannot decode text ({exc})")
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and _ALLOC_FAILURE.search(str(exc))):
        return ("out of memory: the data is too large for this machine "
                f"({first_line(str(exc)) or 'MemoryError'}); use a coarser --spacing-mm or a smaller input")
    if isinstance(exc, RuntimeError) and _TORCH_WRITE_FAILURE.search(str(exc)):
        return f"writing a file failed ({first_line(str(exc))}); is the disk full?"
    return None


def describe(exc: BaseException) -> str:
    """One line for any exception: :func:`user_message`, else ``internal error: Type: message``."""
    message = user_message(exc)
    if message is not None:
        return message
    return f"internal error: {type(exc).__name__}: {first_line(str(exc))}"


# ------------------------------------------------------------------ temporary files of the running command
_temp_paths: list[Path] = []
_aliases: dict[str, str] = {}  # temporary path -> the output it becomes (for messages)
_created_dirs: list[Path] = []
_output_dirs: list[Path] = []
_started = time.time()
_command: list[str] = []


def current_command() -> str | None:
    """The running ``medgmae`` command (for messages such as "`medgmae demo` needs ..."), or None."""
    return _command[0] if _command else None


def begin_command(name: str | None = None) -> None:
    """Forget the previous command's registrations (``cli.main`` calls this before each command)."""
    global _started
    _command[:] = [name] if name else []
    _temp_paths.clear()
    _aliases.clear()
    _created_dirs.clear()
    _output_dirs.clear()
    _started = time.time()


def temp_name(path: str | Path, pid: int | None = None) -> Path:
    """``DIR/.NAME.<pid>.tmp<suffixes>`` beside ``path`` (the suffixes kept, so writers pick the same format)."""
    path = Path(path)
    name = path.name
    kept: list[str] = []
    for suffix in reversed(path.suffixes[-2:]):  # trailing extensions such as ".nii.gz", ".json", ".png"
        if not re.fullmatch(r"\.[A-Za-z][A-Za-z0-9]{0,4}", suffix):
            break
        kept.insert(0, suffix)
    suffixes = "".join(kept)
    stem = name[: len(name) - len(suffixes)] if suffixes else name
    return path.with_name(f".{stem}.{os.getpid() if pid is None else pid}.tmp{suffixes}")


def track_temp(path: str | Path, final: str | Path | None = None) -> Path:
    """Register a temporary file or folder of the running command (removed if the command fails); ``final``:
    the output it will become, named in messages instead of the temporary path."""
    path = Path(path)
    _temp_paths.append(path)
    if final is not None:
        _aliases[str(path)] = str(final)
    return path


def final_names(text: str) -> str:
    """``text`` with registered temporary paths replaced by the outputs they stand for."""
    for _ in range(3):  # a temporary file of a staged temporary file
        changed = text
        for tmp, final in sorted(_aliases.items(), key=lambda kv: -len(kv[0])):
            changed = changed.replace(tmp, final)
        if changed == text:
            break
        text = changed
    return text


def untrack_temp(path: str | Path) -> None:
    path = Path(path)
    while path in _temp_paths:
        _temp_paths.remove(path)


def watch_output_dir(path: str | Path) -> None:
    """A folder the command writes into: on failure, temporary files created there by this command go too."""
    path = Path(path)
    if path not in _output_dirs:
        _output_dirs.append(path)


def make_output_dir(path: str | Path) -> Path:
    """``mkdir -p`` that remembers which folders it created (removed again, if empty, when the command fails)."""
    path = Path(path).expanduser()
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(errno.EEXIST, f"cannot create output folder {path}: a file of that name exists", str(path)) from None
    except OSError as exc:
        raise OutputError(exc.errno, f"cannot create output folder {path}: "
                                     f"{os_error_reason(exc)}", str(path)) from None
    _created_dirs.extend(reversed(missing))
    watch_output_dir(path)
    return path


def _remove(path: Path) -> bool:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        return not path.exists()
    except OSError:
        return False


_TEMP_PATTERN = re.compile(r"(^\..+\.(\d+)\.(tmp|link)([.\w]*)$)|(\.tmp(\.\w+)?$)|(^_?tmp)|(\.tmp\.)")


def is_temp_name(name: str) -> bool:
    return bool(_TEMP_PATTERN.search(name))


def cleanup_command() -> list[str]:
    """Remove the failed command's temporary files: registered ones, temp-named files it created in its output
    folders, and output folders it created that are now empty. Returns what was removed."""
    removed = []
    for path in reversed(_temp_paths):
        if path.exists() and _remove(path):
            removed.append(str(path))
    _temp_paths.clear()
    for folder in _output_dirs:
        try:
            entries = list(folder.iterdir()) if folder.is_dir() else []
        except OSError:
            entries = []
        for entry in entries:
            try:
                fresh = entry.lstat().st_mtime >= _started - 1.0
            except OSError:
                continue
            if fresh and is_temp_name(entry.name) and _remove(entry):
                removed.append(str(entry))
    for folder in sorted(_created_dirs, key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()  # only if empty
            removed.append(str(folder))
        except OSError:
            pass
    _created_dirs.clear()
    return removed


def finish_command() -> None:
    """The command succeeded: its registrations are forgotten (nothing is removed)."""
    _temp_paths.clear()
    _aliases.clear()
    _created_dirs.clear()
    _output_dirs.clear()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Write to a temporary path beside ``path``; on success it is renamed over ``path``, on failure removed."""
    path = Path(path)
    tmp = track_temp(temp_name(path), final=path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    finally:
        untrack_temp(tmp)


class StagedOutputs:
    """All of a command's outputs, or none: each is written to a temporary path, then all are renamed at once.

    ``staged = StagedOutputs(); write(staged.path(final)); ...; staged.commit()``. With ``staging_dir=FOLDER``
    the temporary paths are the final names inside one hidden folder ``FOLDER/.staging.<pid>.tmp`` (so helper
    files a writer leaves beside its output go with it). On failure (or ``discard()``) everything temporary is
    removed; if a rename fails half-way the error names what was and was not written.
    """

    def __init__(self, staging_dir: str | Path | None = None) -> None:
        self.items: list[tuple[Path, Path]] = []
        self.folder: Path | None = None
        if staging_dir is not None:
            self.folder = track_temp(Path(staging_dir) / f".staging.{os.getpid()}.tmp")
            self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, final: str | Path) -> Path:
        final = Path(final)
        if self.folder is not None:
            tmp = self.folder / final.name
            _aliases[str(tmp)] = str(final)
        else:
            tmp = track_temp(temp_name(final), final=final)
        self.items.append((tmp, final))
        return tmp

    def commit(self) -> list[Path]:
        done: list[Path] = []
        for tmp, final in self.items:
            if not tmp.exists():
                continue
            try:
                os.replace(tmp, final)
            except OSError as exc:
                rest = [str(f) for _, f in self.items if f not in done]
                self.discard()
                raise OutputError(exc.errno, f"{os_error_message(exc)}; wrote {[str(p) for p in done] or 'nothing'}, "
                                             f"not {rest}", str(final)) from None
            untrack_temp(tmp)
            done.append(final)
        self.items = []
        self.discard()
        return done

    def discard(self) -> None:
        for tmp, _ in self.items:
            _remove(tmp)
            untrack_temp(tmp)
        self.items = []
        if self.folder is not None:
            _remove(self.folder)
            untrack_temp(self.folder)
            self.folder = None


# ------------------------------------------------------------------ stale files of killed processes
_STALE = re.compile(r"^\..+\.(\d+)\.(tmp|link)([.\w]*)$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def stale_temp_files(folder: str | Path) -> list[Path]:
    """``.NAME.<pid>.tmp...`` / ``.NAME.<pid>.link`` files in ``folder`` whose process no longer runs."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for entry in folder.iterdir():
        m = _STALE.match(entry.name)
        if m and not _pid_alive(int(m.group(1))):
            out.append(entry)
    return sorted(out)


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete :func:`stale_temp_files` (e.g. a checkpoint write interrupted by SIGKILL); returns them."""
    removed = [p for p in stale_temp_files(folder) if _remove(p)]
    if removed:
        log.warning("removed %d stale temporary file(s) of killed runs in %s: %s", len(removed), folder,
                    ", ".join(p.name for p in removed))
    return removed


# ------------------------------------------------------------------ memory
def available_memory_bytes() -> int | None:
    """``MemAvailable`` from /proc/meminfo (Linux), else physical memory, else None."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


__all__ = ["UserError", "InputError", "SizeLimitError", "NoUsableInputError", "OutputError", "EXIT_USER_ERROR",
           "user_message", "describe", "os_error_message", "os_error_reason", "first_line", "root_cause", "begin_command", "finish_command",
           "cleanup_command", "track_temp", "final_names", "untrack_temp", "temp_name", "atomic_path", "StagedOutputs",
           "make_output_dir", "watch_output_dir", "stale_temp_files", "remove_stale_temp_files", "is_temp_name",
           "available_memory_bytes"]
