"""The `diffmpm` console script: the CLI, with Ctrl-C while its modules load reported like any other (one line,
exit 130) instead of a traceback. Commands handle Ctrl-C themselves once they run."""

from __future__ import annotations

import sys


def main() -> None:
    from . import interrupts

    interrupts.install()
    try:
        from .cli import app
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted (Ctrl-C)\n")
        raise SystemExit(130) from None
    app(prog_name="diffmpm")
