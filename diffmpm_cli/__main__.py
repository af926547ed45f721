"""`python -m diffmpm_cli ...` is the `diffmpm` command."""

from .cli import app

app(prog_name="diffmpm")
