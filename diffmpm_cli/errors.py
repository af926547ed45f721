"""Typed errors. Library code raises these; only the CLI prints them and picks exit codes."""

from __future__ import annotations


class DiffMPMError(Exception):
    """Base of every error diffmpm raises on purpose (bad input, failed run)."""

    exit_code = 1


class ConfigError(DiffMPMError):
    """A scene (or an override) is malformed. Each issue names a key path and the problem.

    ``issues`` is a list of ``(key_path, message)``; ``str()`` gives one line per issue, e.g.
    ``sim.dt: must be > 0, got -0.001``.
    """

    exit_code = 2

    def __init__(self, issues: list[tuple[str, str]] | str, message: str | None = None):
        if isinstance(issues, str):
            issues = [(issues, message or "")]
        self.issues = list(issues)
        super().__init__("\n".join(_line(path, msg) for path, msg in self.issues))

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.issues]


class PathError(DiffMPMError):
    """Bad input about one thing named by a key path or file path: ``path: message``. Exit code 2."""

    exit_code = 2

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(_line(path, message))


class AssetError(PathError):
    """A shape or mesh cannot become particles: missing file, not a mesh, not watertight, empty."""


class SimulationError(DiffMPMError):
    """The simulation cannot run or went wrong (unstable time step, non-finite state)."""

    exit_code = 2


MAX_LINE = 600  # characters of one error line: a value quoted in a message never floods the terminal


def clip(text: str, limit: int = MAX_LINE) -> str:
    """``text`` shortened to at most ``limit`` characters by eliding its middle (the start and end are kept)."""
    if len(text) <= limit:
        return text
    tail = limit // 4
    return f"{text[:limit - tail - 5]} ... {text[-tail:]}"


def _line(path: str, message: str) -> str:
    return clip(f"{path}: {message}" if path else message)


class RenderCapacityError(DiffMPMError):
    """A render with fixed-capacity intersection buffers needed more intersections than they hold."""


class CheckpointError(PathError):
    """A checkpoint file cannot be used: unreadable, or holding more than tensors and plain data."""
