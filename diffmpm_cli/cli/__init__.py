"""The `diffmpm` command line: one module per command, each thin (parse -> call the library -> exit code)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from typer.core import TyperGroup

from .. import __version__
from . import check_grad, info, optimize, render, scenes, sweep, validate
from .bench import bench_app
from .common import print_error

try:  # typer >= 0.24 carries its own copy of click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer on the real click
    from click import exceptions as click_exceptions


class DiffMPMGroup(TyperGroup):
    """The root command: a usage error (unknown option, missing argument, bad option value) is one
    ``error: ...`` line on stderr with exit code 2, as bad input in a scene is, instead of a boxed panel."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_exceptions.NoArgsIsHelpError as exc:  # `diffmpm` alone: the help, as before
            typer.echo(exc.ctx.get_help())
            code = exc.exit_code
        except click_exceptions.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if isinstance(exc, click_exceptions.UsageError) and ctx else ""
            print_error(" ".join(exc.format_message().split()).rstrip(".") + hint)
            code = exc.exit_code
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            code = 1
        # without standalone mode click returns an Exit's code, or what the command returned (commands return None)
        code = code if isinstance(code, int) and not isinstance(code, bool) else 0
        if standalone_mode:
            sys.exit(code)
        return code


EPILOG = """[bold]Examples[/]

  diffmpm scenes

  diffmpm validate scenes/sphere_to_snowman.yaml

  diffmpm optimize sphere_to_snowman --iters 40

  diffmpm render runs/demo --frames all --format gif

  diffmpm check-grad scenes/sphere_to_snowman.yaml --stage sim

  diffmpm bench mpm --device cuda --json > mpm.json

Every command takes --help. Refused input is one line 'error: key.path: problem' on stderr, exit code 2.
"""

app = typer.Typer(
    name="diffmpm",
    cls=DiffMPMGroup,
    help="Differentiable MPM shape and material optimisation. Exit codes: 0 ok, 1 failure, 2 bad input.",
    epilog=EPILOG,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"diffmpm {__version__}")
        raise typer.Exit(0)


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                          callback=_print_version)] = False,
) -> None:
    """Differentiable MPM shape and material optimisation."""


validate.register(app)
info.register(app)
check_grad.register(app)
optimize.register(app)
render.register(app)
app.add_typer(bench_app, name="bench")
scenes.register(app)
sweep.register(app)


def main() -> None:
    app()
