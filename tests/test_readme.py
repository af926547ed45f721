"""The README stays true: its Python example runs and its CLI reference names every command."""

from __future__ import annotations

import re

from conftest import REPO
from typer.testing import CliRunner

from diffmpm_cli.cli import app

README = (REPO / "README.md").read_text()


def test_python_example_runs(monkeypatch):
    monkeypatch.chdir(REPO)
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["E"].grad is not None and bool(namespace["E"].grad.isfinite())


def test_cli_reference_covers_every_command():
    listed = re.findall(r"^### `diffmpm (\w[\w-]*)", README, re.M)
    result = CliRunner().invoke(app, ["--help"])
    commands = re.findall(r"│ (\w[\w-]*)\s{2,}", result.stdout)
    assert commands, result.stdout
    for command in commands:
        assert command in listed, f"`diffmpm {command}` is not documented in the README"
