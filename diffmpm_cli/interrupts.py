"""Ctrl-C that a library swallowed still counts.

Some libraries import their optional parts inside ``except BaseException`` (trimesh does), so a Ctrl-C that lands
while they load raises KeyboardInterrupt into a handler that drops it, and the command would run on to the end as
if nothing had been pressed (measured: SIGINT 1.5 s after `diffmpm optimize` started gave exit 0 and no message).
``install()`` (the console script, first thing) puts in a SIGINT handler that raises KeyboardInterrupt as Python's
own does and also remembers the press; ``pressed()`` tells a command that one came, caught or not.
"""

from __future__ import annotations

import signal

_pressed = False


def _on_sigint(signum, frame):
    global _pressed
    _pressed = True
    raise KeyboardInterrupt


def install() -> None:
    """Make SIGINT raise KeyboardInterrupt and be remembered (unless SIGINT is ignored, as under `nohup`)."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _on_sigint)


def pressed() -> bool:
    """Whether Ctrl-C was pressed since ``install()`` while this handler was in place."""
    return _pressed
