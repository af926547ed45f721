"""A run folder: who may write into it (an OS lock), what it may hold, and where outputs may go.

Locking: ``RunFolder.acquire()`` takes an exclusive ``flock`` on the folder itself (its directory descriptor), held
until ``release()`` or the end of the process. Nothing is written for it (no lock file to go stale or to delete),
and the kernel drops the lock when the process dies, ``kill -9`` included, so a killed run never blocks
``--resume``. A second writer (another ``optimize`` on the same ``--out``, ``--resume`` on a running run, ``render``
into the run folder) is refused at once with exit 2. POSIX only (``fcntl``): Linux and macOS.

Writing: an ``OSError`` while writing becomes a typed error: a place that cannot be written (permission, read-only
file system, a file where a folder is expected) is bad input, exit 2; a full disk or an I/O error is a failure,
exit 1, and a run keeps its last good checkpoint (checkpoints are written atomically, the ledger after them).
"""

from __future__ import annotations

import errno
import functools
import os
import re
from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError, DiffMPMError, PathError
from ..outputs.files import slug as slug  # re-exported: the CLI names run and render folders with it

CONFIG = "config.resolved.yaml"
METRICS = "metrics.jsonl"
# what a run folder may hold (besides the temporaries of a write in progress, see remove_stale_temporaries)
CONTENTS = (CONFIG, METRICS, "summary.json", "checkpoints/", "renders/", "final/", "renders_*/")
# temporaries of an atomic write: .<name>.<8 random chars>.tmp[.<suffix>] (tempfile.mkstemp in the same folder)
TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$")
# errno values that mean "this place cannot be written" (the user's choice of place: bad input, exit 2)
UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP}


class WriteFailed(DiffMPMError):
    """An output could not be written (no space left, an I/O error). Exit code 1."""

    exit_code = 1


class Interrupted(DiffMPMError):
    """Ctrl-C. Exit code 130."""

    exit_code = 130


def interruptible(command: Callable) -> Callable:
    """Ctrl-C anywhere in ``command`` (its start-up imports included) becomes one ``error: interrupted`` line and
    exit 130 (Typer would exit 130 silently). Put it under ``@handle_errors``."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            result = command(*args, **kwargs)
        except KeyboardInterrupt:
            raise Interrupted("interrupted (Ctrl-C)") from None
        check_not_interrupted()  # a Ctrl-C some library swallowed (interrupts.py) still ends in exit 130
        return result

    return wrapper


def check_not_interrupted() -> None:
    """Raise Interrupted if Ctrl-C was pressed though no KeyboardInterrupt reached us (a library swallowed it)."""
    from ..interrupts import pressed

    if pressed():
        raise Interrupted("interrupted (Ctrl-C)")


def write_error(exc: OSError, *, what: str = "", last_good: Path | None = None) -> DiffMPMError:
    """The typed error for an OSError raised while writing outputs (see the module docstring)."""
    where = exc.filename or what or "output"
    problem = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in UNWRITABLE or isinstance(exc, PermissionError):
        return PathError(str(where), f"cannot write here: {problem}")
    note = f"; the last good checkpoint is {last_good}" if last_good is not None else ""
    return WriteFailed(f"{where}: writing failed: {problem}{note}")


def writable(folder: Path) -> bool:
    """Whether this process may create files in ``folder``."""
    return os.access(folder, os.W_OK | os.X_OK)


def first_existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (absolute)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_file(path: Path | None, option: str) -> None:
    """Refuse, before any work, an output file that cannot be written: a folder, a path under a file, a folder
    that is not writable. ConfigError (exit 2)."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise ConfigError(option, f"{path} is a folder; give a file name")
    if path.exists() and not path.is_file():
        raise ConfigError(option, f"{path} is not a regular file")
    parent = first_existing(path.parent)
    if not parent.is_dir():
        raise ConfigError(option, f"{parent} is not a folder")
    if not writable(parent):
        raise ConfigError(option, f"cannot write in {parent}: permission denied")


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the half-written temporaries of atomic writes that a killed process left in ``folder`` and its
    subfolders (names like ``.iter_000010.pt.k3j_x9a2.tmp`` or ``.view0.abcd1234.tmp.png``). Call it only while
    holding the folder's lock. Returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.rglob(".*.tmp*"):
        if TEMPORARY.match(path.name) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def holds_run(folder: Path) -> bool:
    return (Path(folder) / CONFIG).exists() or (Path(folder) / METRICS).exists()


def run_config(folder: Path, option: str) -> Path:
    """A run folder's config.resolved.yaml; ConfigError (exit 2) naming ``option`` when ``folder`` holds no run."""
    config = Path(folder) / CONFIG
    if not config.is_file():
        raise ConfigError(option, f"{folder} holds no run (no {CONFIG})")
    return config


class RunFolder:
    """The folder of one run, checked before any work and locked for as long as anything writes into it.

    ``resume``: the folder must hold a run; otherwise it must not exist yet or be empty. ``option`` names the
    command-line option in messages (``--out``, ``--resume``, ``RUN_DIR``)."""

    def __init__(self, path: Path, *, resume: bool, option: str = "--out"):
        self.path = Path(path)
        self.resume = resume
        self.option = option
        self._fd: int | None = None

    @property
    def locked(self) -> bool:
        return self._fd is not None

    def check(self) -> None:
        """Refuse (ConfigError, exit 2, nothing written) a path that cannot be this run's folder."""
        path, option = self.path, self.option
        if path.exists() and not path.is_dir():
            raise ConfigError(option, f"{path} is not a folder")
        if self.resume:
            run_config(path, option)
            return
        if path.is_dir():
            if holds_run(path):
                raise ConfigError(option, f"{path} already holds a run: use --resume {path} or another folder")
            if any(path.iterdir()):
                # never write summary.json, final/ or checkpoints/ over files that are not this tool's
                raise ConfigError(option, f"{path} is not empty and holds no diffmpm run: choose a new or empty "
                                          "folder")
        parent = first_existing(path)
        if not parent.is_dir():
            raise ConfigError(option, f"{parent} is not a folder")
        if not writable(parent):
            raise ConfigError(option, f"cannot write in {parent}: permission denied")

    def acquire(self, *, create: bool = False) -> None:
        """Lock the folder (making it first when ``create``); ConfigError (exit 2) when another process holds it.
        After the lock the checks run again: the folder may have changed while this process was starting."""
        if self._fd is not None:
            return
        if create:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise write_error(exc, what=str(self.path)) from exc
        self._fd = lock_folder(self.path, option=self.option,
                               holder="another diffmpm process (a run or a render is writing into it)")
        try:
            self.check()  # again: another process may have filled the folder between our first check and the lock
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_folder(path: Path, *, option: str, holder: str) -> int:
    """Open an existing folder and take an exclusive flock on it (dropped when the descriptor closes or the process
    dies); the descriptor. ConfigError at ``option`` when ``holder`` (who else would hold it, for the message) has it
    or it cannot be opened or locked."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise ConfigError(option, f"{path}: cannot open ({exc.strerror})") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ConfigError(option, f"{path} is in use by {holder}; wait for it to finish or choose another "
                                      "folder") from None
        raise ConfigError(option, f"{path}: cannot lock ({exc.strerror})") from exc
    return fd


def lock_for_writing(folder: Path, *, option: str) -> RunFolder:
    """Lock an existing run folder that a command other than ``optimize`` writes into (``render`` into
    RUN_DIR/renders_*); the caller releases it."""
    lock = RunFolder(folder, resume=True, option=option)
    lock.acquire()
    return lock


def config_difference(before, after, *, ignore=frozenset()) -> tuple[str, str, str] | None:
    """The first key path (with both values, shortened) where two scenes differ, or None when they are equal
    (keys in ``ignore`` aside)."""

    def walk(a, b, path: str):
        if path in ignore:
            return None
        if isinstance(a, dict) and isinstance(b, dict):
            for key in list(a) + [k for k in b if k not in a]:
                found = walk(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
                if found is not None:
                    return found
            return None
        if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                found = walk(x, y, f"{path}[{i}]")
                if found is not None:
                    return found
            return None
        return None if a == b else (path, _short(a), _short(b))

    return walk(before.model_dump(mode="json"), after.model_dump(mode="json"), "")


def _short(value) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."
