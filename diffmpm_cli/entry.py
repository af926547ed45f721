"""The `diffmpm` console script: the CLI, with Ctrl-C while its modules load reported like any other (one line,
exit 130) instead of a traceback. Commands handle Ctrl-C themselves once they run."""

from __future__ import annotations

import sys


def main() -> None:
    from . import interrupts

    interrupts.install()
    try:
        from .cli import app

        # Typer builds the command from the functions' signatures before any command runs: a Ctrl-C there is
        # still "while starting" (seen in CI at 0.3 s after start)
        app(prog_name="diffmpm")
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted (Ctrl-C)\n")
        raise SystemExit(130) from None
