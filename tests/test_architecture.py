"""The import rule of docs/ARCHITECTURE.md: every module imports only from layers below its own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# rank of each top-level layer of the package (docs/ARCHITECTURE.md); a module may import a lower rank only,
# or its own layer
RANK = {
    "diffmpm_cli": 0, "enums": 0, "errors": 0, "interrupts": 0, "heap": 0,
    "kernels": 1, "config": 1, "warp_runtime": 1,
    "sim": 2, "render": 2, "provenance": 2,
    "assets": 3, "splats": 3, "losses": 3, "metrics": 3, "params": 3, "outputs": 3, "reference": 3,
    "pipeline": 4, "summary": 4,
    "optimize": 5,
    "bench": 6, "gradcheck": 6, "sweep": 6,
    "cli": 7,
    "entry": 8, "__main__": 9,
}
ONLY = {  # layers that may import nothing from the package but these
    "enums": set(), "errors": set(), "warp_runtime": set(), "interrupts": set(), "heap": set(),
    "kernels": {"enums"},
    "config": {"enums", "errors"},
}
NEVER = {  # third-party modules a layer must not import
    "kernels": {"torch", "numpy"},
    "config": {"torch", "warp", "trimesh"},
    "enums": {"torch", "warp", "numpy"},
    "errors": {"torch", "warp", "numpy"},
}
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()  # (importing module, imported module) allowed for now: none


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[0] == "kernels":  # installed as diffmpm_cli.kernels
        parts = ["diffmpm_cli", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def package_files() -> list[Path]:
    files = [*(REPO / "diffmpm_cli").rglob("*.py"), *(REPO / "kernels").glob("*.py")]
    return sorted(f for f in files if not f.is_symlink() and "scenes" not in f.relative_to(REPO).parts)


def imports(module: str, source: str, *, is_package: bool = False) -> list[tuple[str, int]]:
    """(imported module, line) for every import in ``source``, relative ones resolved, function-level ones included."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source, filename=module)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                if node.module:
                    found.append((target, node.lineno))
                else:  # from . import a, b: each name may be a module
                    found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
            else:
                found.append((node.module, node.lineno))
    return found


def violations(extra: dict[str, str] | None = None) -> list[str]:
    """Every import that breaks the rule, in the package plus ``extra`` ({module name: source})."""
    sources = [(module_name(p), str(p.relative_to(REPO)), p.read_text(), p.name == "__init__.py")
               for p in package_files()]
    sources += [(name, name, text, False) for name, text in (extra or {}).items()]
    problems = []
    for module, where_file, text, is_package in sources:
        own = layer(module)
        assert own in RANK, f"{module}: layer '{own}' has no rank in docs/ARCHITECTURE.md / this test"
        for target, line in imports(module, text, is_package=is_package):
            where = f"{where_file}:{line} imports {target}"
            top = target.split(".")[0]
            if top in NEVER.get(own, set()):
                problems.append(f"{where}: {own} must not import {top}")
            if top != "diffmpm_cli":
                continue
            other = layer(target)
            if other == own:
                continue
            if other == "__version__":
                other = "diffmpm_cli"
            if (module, target) in KNOWN_EXCEPTIONS:
                continue
            if own in ONLY and other not in ONLY[own]:
                problems.append(f"{where}: {own} may import only {sorted(ONLY[own]) or 'nothing'} of the package")
            elif other not in RANK:
                problems.append(f"{where}: layer '{other}' has no rank")
            elif RANK[other] >= RANK[own]:
                problems.append(f"{where}: {own} (layer {RANK[own]}) may not import {other} (layer {RANK[other]})")
    return problems


def test_every_import_goes_down_the_layers():
    assert violations() == []


def test_the_rule_can_fail():
    """Imports against the rule are caught (the check is not vacuous)."""
    found = violations({
        "diffmpm_cli.config.probe": "from ..sim.grid import GridSpec\nimport torch\n",
        "diffmpm_cli.kernels.probe": "def f():\n    import torch\n",
        "diffmpm_cli.sim.probe": "from ..cli import app\n",
        "diffmpm_cli.pipeline": "from .optimize import run\n",
    })
    assert any("config.probe:1" in p and "config may import only" in p for p in found), found
    assert any("config.probe:2" in p and "must not import torch" in p for p in found), found
    assert any("kernels.probe:2" in p and "must not import torch" in p for p in found), found
    assert any("sim.probe:1" in p and "may not import cli" in p for p in found), found
    assert any("diffmpm_cli.pipeline:1" in p and "may not import optimize" in p for p in found), found
    assert len(found) == 5, found


@pytest.mark.parametrize("name", ["kernels", "config", "sim", "cli"])
def test_each_layer_has_modules(name):
    assert any(layer(module_name(p)) == name for p in package_files())
