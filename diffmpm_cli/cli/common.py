"""What every command shares: error -> exit-code mapping and the consoles."""

from __future__ import annotations

import functools
import json
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import DiffMPMError, clip

# tables stay whole when the output is a file or a pipe (rich would wrap them at 80 columns)
out = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, highlight=False)

SET_HELP = "Override a scene key, KEY=VALUE (repeatable), e.g. --set sim.dt=5e-4 --set render.cameras[0].fov=30."

# the options several commands share, in Typer's Annotated style
SceneArg = Annotated[Path, typer.Argument(help="Scene YAML file, or the name of a shipped scene (diffmpm scenes).")]
SetOpt = Annotated[list[str], typer.Option("--set", help=SET_HELP)]
DeviceOpt = Annotated[str, typer.Option(help="cpu or cuda[:i].")]
# one --json convention for every command: the result as one JSON document on stdout, everything else on stderr
# (redirect it to keep a file: diffmpm bench mpm --json > mpm.json)
JsonFlag = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (anything else goes to "
                                                       "stderr or is left out).")]


def console_for(as_json: bool) -> Console:
    """Where a command's human-readable output goes: stderr when stdout carries the JSON result."""
    return err if as_json else out


def print_json(data, *, indent: int | None = None) -> None:
    """The command's result as one JSON document on stdout."""
    typer.echo(json.dumps(data, indent=indent))


def print_error(line: str) -> None:
    """One ``error: ...`` line on stderr; the text is printed as it is (brackets are not Rich markup)."""
    err.print(f"[bold red]error:[/] {escape(clip(line))}", markup=True, soft_wrap=True)


def handle_errors(command):
    """Print a DiffMPMError as ``error: key.path: problem`` on stderr and exit with its code (2 = bad input).

    Warnings raised while the command runs (numpy, trimesh, Pillow) are held back until it ends and dropped when it
    refuses its input, so that the error is the only thing a refused input prints on stderr.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        refused = None
        caught: list = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                try:
                    return command(*args, **kwargs)
                except DiffMPMError as exc:
                    refused = exc
        finally:
            if refused is None:
                for w in caught:
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        for line in str(refused).splitlines() or [type(refused).__name__]:
            print_error(line)
        raise typer.Exit(refused.exit_code)

    return wrapper


def check_device(device: str) -> None:
    """--device must be cpu or cuda[:i], and CUDA must be there when asked for (ConfigError, exit 2, otherwise)."""
    import torch

    from ..errors import ConfigError

    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError("--device", f"must be cpu or cuda[:i], got '{device}'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device", f"'{device}' requested but CUDA is not available here (see diffmpm info)")


def parse_size(text: str) -> tuple[int, int]:
    from ..errors import ConfigError

    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise ConfigError("--size", f"must be WIDTHxHEIGHT, e.g. 1024x1024, got '{text}'") from exc
    if not (1 <= width <= 8192 and 1 <= height <= 8192):
        raise ConfigError("--size", f"must be between 1x1 and 8192x8192, got '{text}'")
    return width, height
