"""Loading a scene: YAML -> overrides -> presets -> schema -> asset paths -> semantic cross-checks.

Every failure is a ConfigError whose lines read ``key.path: problem``.
"""

from __future__ import annotations

import copy
import difflib
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import ConfigError
from .schema import SHAPE_TYPES, MeshFile, Scene

SCENE_KEYS = tuple(Scene.model_fields)


# ----------------------------------------------------------------------------------------------------------------
# YAML


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of silently keeping the last."""


def _mapping_without_duplicates(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)
# YAML 1.2 floats: PyYAML (YAML 1.1) reads 1e-3 or 5e4 as strings; a scene means numbers
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    """YAML text -> Python data with the scene loader (safe, YAML 1.2 floats, no duplicate keys)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: Path) -> dict:
    """The mapping in a YAML file; ConfigError for a missing/unreadable file, bad syntax, or a non-mapping."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError("", f"scene file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"cannot read scene file {path}: {exc}") from exc
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError("", f"{where}: YAML syntax error: {problem}") from exc
    if data is None:
        raise ConfigError("", f"scene file {path} is empty")
    if not isinstance(data, dict):
        raise ConfigError("", f"scene file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------------------------------------------
# --set overrides

_SEGMENT = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _split_key(key: str) -> list[str | int]:
    parts: list[str | int] = []
    for piece in key.split("."):
        if not piece:
            raise ConfigError(f"--set {key}", "empty key segment")
        pos = 0
        for match in _SEGMENT.finditer(piece):
            if match.start() != pos:
                break
            name, index = match.groups()
            parts.append(int(index) if index is not None else (int(name) if name.isdigit() else name))
            pos = match.end()
        if pos != len(piece):
            raise ConfigError(f"--set {key}", f"cannot parse key segment '{piece}'")
    return parts


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """A copy of ``data`` with ``key.path=value`` overrides applied (values parsed as YAML, typed by the schema).

    List items are addressed as ``render.cameras[0].fov`` or ``render.cameras.0.fov``.
    """
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}", "expected KEY=VALUE, e.g. sim.dt=0.001")
        key, text = item.split("=", 1)
        key = key.strip()
        try:
            value = parse_yaml(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}", f"cannot parse value '{text}': {exc}") from exc
        parts = _split_key(key)
        node: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(part, int):
                if not isinstance(node, list):
                    raise ConfigError(f"--set {key}", f"'{_format_path(parts[:depth])}' is not a list")
                if part >= len(node):
                    raise ConfigError(f"--set {key}", f"index {part} out of range for '{_format_path(parts[:depth])}' "
                                                      f"({len(node)} items)")
            elif not isinstance(node, dict):
                raise ConfigError(f"--set {key}", f"'{_format_path(parts[:depth])}' is not a mapping")
            if last:
                node[part] = value
            else:
                if isinstance(node, dict) and (part not in node or node[part] is None):
                    node[part] = [] if isinstance(parts[depth + 1], int) else {}
                node = node[part]
    return data


# ----------------------------------------------------------------------------------------------------------------
# presets


def config_path(name: str) -> Path:
    """A file of the shipped ``configs/`` folder (installed as ``diffmpm_cli.configs``)."""
    return Path(str(resources.files("diffmpm_cli.configs").joinpath(name)))


def material_presets() -> dict[str, dict]:
    return read_yaml(config_path("materials.yaml"))


def _expand_preset(data: dict) -> dict:
    material = data.get("material")
    if not isinstance(material, dict) or not isinstance(material.get("preset"), str):
        return data
    presets = material_presets()
    name = material["preset"]
    if name not in presets:
        close = difflib.get_close_matches(name, list(presets), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError("material.preset", f"unknown preset '{name}' ({hint}available: {', '.join(presets)})")
    data = dict(data)
    data["material"] = {**presets[name], **material}
    return data


# ----------------------------------------------------------------------------------------------------------------
# pydantic errors -> key paths


def _format_path(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _key_loc(loc: tuple, raw: Any, *, missing: bool) -> list:
    """Keep the parts of a pydantic location that exist in the input (drops union tags such as 'sphere').

    For a missing key the last part is kept although the input lacks it.
    """
    kept, node = [], raw
    if missing:
        return _key_loc(loc[:-1], raw, missing=False) + list(loc[-1:])
    for part in loc:
        if isinstance(node, dict) and part in node:
            kept.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            kept.append(part)
            node = node[part]
        elif not isinstance(node, (dict, list)):
            kept.append(part)
            node = None
    return kept


def _num(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _show(value: Any) -> str:
    text = _num(value) if isinstance(value, float) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(err: dict) -> tuple[list, str]:
    """(extra location parts, message) for one pydantic error."""
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    got = f", got {_show(value)}"
    simple = {
        "missing": "required key missing",
        "greater_than": f"must be > {_num(ctx.get('gt'))}{got}",
        "greater_than_equal": f"must be >= {_num(ctx.get('ge'))}{got}",
        "less_than": f"must be < {_num(ctx.get('lt'))}{got}",
        "less_than_equal": f"must be <= {_num(ctx.get('le'))}{got}",
        "finite_number": f"must be a finite number{got}",
        "float_parsing": f"must be a number{got}",
        "float_type": f"must be a number{got}",
        "int_parsing": f"must be an integer{got}",
        "int_type": f"must be an integer{got}",
        "int_from_float": f"must be an integer{got}",
        "bool_parsing": f"must be true or false{got}",
        "bool_type": f"must be true or false{got}",
        "string_type": f"must be a string{got}",
        "list_type": f"must be a list{got}",
        "model_type": f"must be a mapping of keys{got}",
        "model_attributes_type": f"must be a mapping of keys{got}",
        "dict_type": f"must be a mapping of keys{got}",
    }
    if kind in simple:
        return [], simple[kind]
    if kind in ("item_count", "grid_size"):  # our own PydanticCustomErrors carry a complete message
        return [], err["msg"]
    if kind == "unknown_key":
        return [ctx["key"]], ctx["hint"].join(("unknown key (", ")"))
    if kind == "too_short":
        return [], f"must have at least {ctx.get('min_length')} items, got {ctx.get('actual_length')}"
    if kind == "too_long":
        return [], f"must have at most {ctx.get('max_length')} items, got {ctx.get('actual_length')}"
    if kind == "literal_error":
        expected = ctx.get("expected", "")
        options = re.findall(r"'([^']*)'", expected)
        close = difflib.get_close_matches(str(value), options, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return [], f"must be one of {expected}{got}{hint}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        discriminator = ctx.get("discriminator", "").strip("'")
        expected = ctx.get("expected_tags") or _expected_tags(discriminator)
        if kind == "union_tag_not_found":
            return [discriminator], f"required key missing (one of {expected})"
        options = re.findall(r"'([^']*)'", expected)
        close = difflib.get_close_matches(str(ctx.get("tag")), options, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return [discriminator], f"unknown {discriminator} {ctx.get('tag')!r} (expected one of {expected}{hint})"
    return [], f"{err['msg']}{got}"


def _expected_tags(discriminator: str) -> str:
    if discriminator == "shape":
        tags = [t.model_fields["shape"].annotation.__args__[0] for t in SHAPE_TYPES]
    else:
        tags = ["orbit", "pinhole"]
    return ", ".join(f"'{t}'" for t in tags)


def _config_error(exc: ValidationError, raw: dict) -> ConfigError:
    issues = []
    for err in exc.errors():
        extra, message = _describe(err)
        loc = _key_loc(err["loc"], raw, missing=err["type"] == "missing")
        issues.append((_format_path(loc + extra), message))
    return ConfigError(issues)


# ----------------------------------------------------------------------------------------------------------------
# loading


def load_scene(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Scene:
    """Load, override, validate and cross-check a scene file. Raises ConfigError with key paths."""
    path = Path(path)
    raw = apply_overrides(read_yaml(path), overrides)
    return scene_from_dict(raw, base_dir=path.resolve().parent, default_name=path.stem)


def scene_from_dict(raw: dict, *, base_dir: Path, default_name: str = "scene") -> Scene:
    """Validate a scene mapping: presets, schema, paths relative to ``base_dir``, cross-checks."""
    if not isinstance(raw, dict):
        raise ConfigError("", f"a scene must be a mapping of sections, got {type(raw).__name__}")
    raw = _expand_preset(raw)
    try:
        scene = Scene.model_validate(raw)
    except ValidationError as exc:
        raise _config_error(exc, raw) from None
    if scene.name is None:
        scene.name = default_name
    _resolve_paths(scene, Path(base_dir))
    from .checks import check_scene

    check_scene(scene)
    return scene


def dump_scene(scene: Scene) -> str:
    """The resolved scene as YAML; ``scene_from_dict(yaml.safe_load(text), ...)`` gives back an equal Scene."""
    return yaml.safe_dump(scene.model_dump(mode="json"), sort_keys=False, default_flow_style=None, width=120)


def iter_shapes(shape, key: str):
    """(key path, shape) for a shape and all its parts, depth first."""
    yield key, shape
    for i, part in enumerate(getattr(shape, "parts", None) or []):
        yield from iter_shapes(part, f"{key}.parts[{i}]")


def _resolve_paths(scene: Scene, base_dir: Path) -> None:
    roots = [("source", scene.source)] + ([("target.mesh", scene.target.mesh)] if scene.target.mesh else [])
    for root_key, root in roots:
        for key, shape in iter_shapes(root, root_key):
            if isinstance(shape, MeshFile):
                shape.path = str(_existing_file(base_dir, shape.path, f"{key}.path"))
    for i, image in enumerate(scene.target.images):
        image.path = str(_existing_file(base_dir, image.path, f"target.images[{i}].path"))


def _existing_file(base_dir: Path, name: str, key: str) -> Path:
    path = (base_dir / Path(name).expanduser()).resolve()
    if not path.is_file():
        raise ConfigError(key, f"file not found: {path}" if not path.exists() else f"not a file: {path}")
    return path
