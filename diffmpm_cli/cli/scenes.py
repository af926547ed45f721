"""`diffmpm scenes`: the example scenes shipped with diffmpm (list, copy), and scene names on the command line.

The scenes (with the meshes and pictures they use, at the same relative paths) are installed as package data in
``diffmpm_cli/scenes``; in a source checkout they are the repository's ``scenes/``. A SCENE argument that names no
existing file but a shipped scene (``sphere_to_snowman`` or ``sphere_to_snowman.yaml``) means that scene.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.markup import escape
from rich.table import Table

from ..optimize.runfolder import interruptible
from .common import handle_errors, out

EPILOG = """[bold]Examples[/]

  diffmpm scenes

  diffmpm scenes copy sphere_to_spot my_scenes

  diffmpm optimize sphere_to_snowman --iters 10
"""

scenes_app = typer.Typer(help="The example scenes shipped with diffmpm: list them, copy one to edit it.",
                         invoke_without_command=True, epilog=EPILOG)


def shipped_folder() -> Path | None:
    """The folder of the shipped scenes: the installed package data, else the source checkout's scenes/."""
    import diffmpm_cli

    package = Path(diffmpm_cli.__file__).resolve().parent
    for folder in (package / "scenes", package.parent / "scenes"):
        if folder.is_dir() and any(folder.glob("*.yaml")):
            return folder
    return None


def shipped_scenes() -> dict[str, Path]:
    """Shipped scene name (file stem) -> its YAML file."""
    folder = shipped_folder()
    return {} if folder is None else {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def resolve_scene(scene: Path) -> Path:
    """``scene`` itself when it exists (or names a folder or path); a bare name of a shipped scene otherwise."""
    scene = Path(scene)
    try:
        if scene.exists() or len(scene.parts) != 1:
            return scene
    except OSError:  # a name too long to look up: not a shipped scene; loading it says what is wrong
        return scene
    name = scene.name[:-5] if scene.name.endswith(".yaml") else scene.name
    return shipped_scenes().get(name, scene)


def describe(path: Path) -> str:
    """The first sentence of a scene file's leading comment."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").strip())
    text = " ".join(lines)
    return text.split(". ")[0].rstrip(".")


def assets_of(path: Path) -> list[Path]:
    """The files a scene refers to (every ``path:`` value, relative to the scene file), and the README beside any
    of them (the meshes' sources and licences)."""
    found: list[Path] = []

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "path" and isinstance(value, str):
                    found.append(Path(value))
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(yaml.safe_load(path.read_text()))
    extra = [p.parent / "README.md" for p in found if (path.parent / p.parent / "README.md").is_file()]
    return sorted({*found, *extra})


@scenes_app.callback()
@handle_errors
@interruptible
def scenes(ctx: typer.Context) -> None:
    """List the shipped example scenes (run one with `diffmpm optimize NAME`)."""
    if ctx.invoked_subcommand is not None:
        return
    from ..errors import ConfigError

    found = shipped_scenes()
    if not found:
        raise ConfigError("scenes", "no shipped scenes found in this installation")
    table = Table(title=f"shipped scenes ({escape(str(shipped_folder()))})", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("what")
    for name, path in found.items():
        table.add_row(escape(name), escape(describe(path)))
    out.print(table)
    out.print("run one: diffmpm optimize NAME; edit a copy: diffmpm scenes copy NAME [DEST]", markup=False)


@scenes_app.command("copy", epilog=EPILOG)
@handle_errors
@interruptible
def copy(
    name: Annotated[str, typer.Argument(help="A shipped scene (see diffmpm scenes).")],
    dest: Annotated[Path, typer.Argument(help="Folder to copy into (made if missing), or a .yaml file "
                                              "name.")] = Path("."),
) -> None:
    """Copy a shipped scene and the meshes/pictures it uses (same relative paths), never overwriting a file."""
    from ..errors import ConfigError
    from ..optimize.runfolder import write_error

    found = shipped_scenes()
    key = name[:-5] if name.endswith(".yaml") else name
    if key not in found:
        raise ConfigError("NAME", f"no shipped scene '{name}'; one of: {', '.join(found) or '(none)'}")
    source = found[key]
    if dest.suffix in (".yaml", ".yml"):
        folder, scene_file = dest.parent, dest
    else:
        folder, scene_file = dest, dest / source.name
    if folder.exists() and not folder.is_dir():
        raise ConfigError("DEST", f"{folder} is not a folder")
    pairs = [(source, scene_file)] + [(source.parent / rel, folder / rel) for rel in assets_of(source)]
    existing = [str(target) for _, target in pairs if target.exists() or target.is_symlink()]
    if existing:
        raise ConfigError("DEST", f"{existing[0]} already exists; nothing was copied (choose another folder)")
    made: list[Path] = []
    try:
        for src, target in pairs:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(src, "rb") as fin, open(target, "xb") as fout:  # "x": never replaces a file
                made.append(target)
                shutil.copyfileobj(fin, fout)
    except OSError as exc:
        for path in made:  # ours, and incomplete as a set
            path.unlink(missing_ok=True)
        raise write_error(exc, what=str(folder)) from exc
    out.print(f"copied {key} to {scene_file}" + (f" with {len(pairs) - 1} file(s) it uses" if len(pairs) > 1 else ""),
              markup=False)


def register(app: typer.Typer) -> None:
    app.add_typer(scenes_app, name="scenes")
