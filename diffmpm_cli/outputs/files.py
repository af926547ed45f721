"""Writing files: one atomic writer (temporary file in the same folder, then ``os.replace``) and one JSON writer.

A run killed at any moment leaves either the old or the new file, never a torn one. New files get the mode a plain
``open(path, "w")`` gives (0o666 less the umask; ``mkstemp`` makes 0o600).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path


def slug(name: str) -> str:
    """A name as a safe file or folder name: letters, digits, '.', '_' and '-' only, at most 80 characters."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")[:80] or "scene"


def umask() -> int:
    """The process's umask (os.umask can only be read by setting it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: 0o666 less the umask."""
    return 0o666 & ~umask()


def atomic_write(path, write: Callable[[Path], None], *, durable: bool = False) -> Path:
    """Call ``write(tmp)`` on a temporary path in ``path``'s folder, then move it onto ``path``; makes parent folders.

    The temporary name (``.<stem>.<8 random>.tmp<suffix>``) keeps ``path``'s suffix, so writers that pick a format
    from the extension still work. ``durable``: the data reach the disk (fsync) before the rename (checkpoints).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path, text: str) -> Path:
    """Replace ``path`` atomically with ``text``."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def json_text(data) -> str:
    """A JSON document as the tool writes it (summary.json, --json files): indented by 2."""
    return json.dumps(data, indent=2)


def json_line(record: dict) -> str:
    """One line of a JSON-lines log (metrics.jsonl), with its newline."""
    return json.dumps(record) + "\n"


def write_json(path, data) -> Path:
    """Replace ``path`` atomically with ``data`` as indented JSON (OSError propagates)."""
    return write_text(path, json_text(data))
