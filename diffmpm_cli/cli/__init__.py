"""The `diffmpm` command line: one module per command, each thin (parse -> call the library -> exit code)."""

from __future__ import annotations

import typer

from .. import __version__
from . import check_grad, info, optimize, render, validate
from .bench import bench_app

app = typer.Typer(
    name="diffmpm",
    help="Differentiable MPM shape and material optimisation. Exit codes: 0 ok, 1 failure, 2 bad input.",
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
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True,
                                 callback=_print_version),
) -> None:
    """Differentiable MPM shape and material optimisation."""


validate.register(app)
info.register(app)
check_grad.register(app)
optimize.register(app)
render.register(app)
app.add_typer(bench_app, name="bench")


def main() -> None:
    app()
