"""Loading a scene: YAML -> overrides -> presets -> schema -> asset paths -> semantic cross-checks.

Every failure is a ConfigError whose lines read ``key.path: problem``.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
import reprlib
import stat
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import ConfigError, clip
from .schema import SHAPE_TYPES, GaussianSource, MeshFile, Scene
from .sequences import is_video

SCENE_KEYS = tuple(Scene.model_fields)


# ----------------------------------------------------------------------------------------------------------------
# YAML
#
# A scene is read with a SafeLoader subclass that follows the YAML 1.2 core schema (what the README promises):
# null, true/false, decimal/0o/0x integers and decimal floats are typed; everything else is a string (YAML 1.1's
# yes/no, 1:30 and dates stay strings). Integers with a leading zero are refused (YAML 1.1 read 010 as octal 8,
# YAML 1.2 reads 10). Duplicate keys and keys that are lists or mappings are refused; merge keys (<<) work.
# Documents are bounded while they are composed, before anything is built from them: MAX_YAML_NODES nodes with
# every alias expanded (an alias "bomb" of a few hundred bytes stops at once), MAX_YAML_DEPTH levels of nesting.

MAX_SCENE_BYTES = 1 << 20  # a scene file is text of a few KB; anything larger is refused unread
MAX_YAML_NODES = 100_000  # nodes of a document, every alias counted as often as it is used
MAX_YAML_DEPTH = 64  # levels of nested lists and mappings
MAX_INT_DIGITS = 40  # digits of an integer literal (every integer key is bounded far below 10**40)

_MERGE_TAG = "tag:yaml.org,2002:merge"
_LEADING_ZERO_TAG = "tag:diffmpm,2024:leading-zero-int"
_CORE_SCHEMA = [  # (tag, regexp, first characters): the YAML 1.2 core schema's tag resolution, in order
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
    (_LEADING_ZERO_TAG, r"^[-+]?0[0-9]+$", list("-+0")),
    ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", list("-+0123456789")),
    ("tag:yaml.org,2002:float",
     r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
     list("-+0123456789.")),
    (_MERGE_TAG, r"^<<$", ["<"]),
]


class _SceneLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema typing, bounded size and nesting, and no duplicate or complex keys."""

    yaml_implicit_resolvers: dict = {}

    def __init__(self, stream):
        super().__init__(stream)
        self._node_count = 0
        self._open_heights: list[int] = []  # per node being composed: the height of its tallest child so far
        self._anchored: dict[int, tuple[int, int]] = {}  # id(anchored node) -> (expanded size, height)

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            if id(node) not in self._anchored:
                raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor} refers to a node that contains "
                                                  "it (recursive structures are not allowed)", event.start_mark)
            size, height = self._anchored[id(node)]
        else:
            if len(self._open_heights) >= MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep",
                                                  event.start_mark)
            start = self._node_count
            self._open_heights.append(0)
            node = super().compose_node(parent, index)
            height = self._open_heights.pop() + 1
            size = self._node_count - start + 1
            if event.anchor is not None:
                self._anchored[id(node)] = (size, height)
        if len(self._open_heights) + height > MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep "
                                              "(with aliases expanded)", event.start_mark)
        if self._open_heights:
            self._open_heights[-1] = max(self._open_heights[-1], height)
        self._node_count += size if isinstance(event, yaml.AliasEvent) else 1
        if self._node_count > MAX_YAML_NODES:
            raise yaml.composer.ComposerError(None, None, f"more than {MAX_YAML_NODES:,} values (aliases counted each "
                                              "time they are used): refused as too large", event.start_mark)
        return node

    def construct_object(self, node, deep=False):
        kind = _NODE_KIND.get(node.tag)
        if kind is not None and not isinstance(node, kind):
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise yaml.constructor.ConstructorError(None, None, f"{tag} cannot tag a {node.id}", node.start_mark)
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, KeyError, OverflowError) as exc:  # a constructor choking on its text
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise yaml.constructor.ConstructorError(None, None, f"cannot read this {node.id} as {tag} "
                                                    f"({type(exc).__name__})", node.start_mark) from None


_NODE_KIND = {f"tag:yaml.org,2002:{name}": kind for name, kind in [
    ("null", yaml.ScalarNode), ("bool", yaml.ScalarNode), ("int", yaml.ScalarNode), ("float", yaml.ScalarNode),
    ("str", yaml.ScalarNode), ("seq", yaml.SequenceNode), ("map", yaml.MappingNode)]}

for _tag, _pattern, _first in _CORE_SCHEMA:
    _SceneLoader.add_implicit_resolver(_tag, re.compile(_pattern), _first)


def _refuse(loader: _SceneLoader, node: yaml.Node, problem: str):
    raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark)


def _construct_mapping(loader: _SceneLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            _refuse(loader, key_node, "a key must be a name, not a list or mapping")
        if key_node.tag == _MERGE_TAG:
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            _refuse(loader, key_node, f"duplicate key '{clip(str(key), 80)}'")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)  # SafeConstructor's: merges << keys first, own keys win


def _construct_int(loader: _SceneLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node).strip()
    digits = text.lstrip("+-")
    if len(digits) > MAX_INT_DIGITS:
        _refuse(loader, node, f"an integer of {len(digits)} digits is too long")
    try:
        if digits.startswith(("0o", "0x")):
            value = int(digits[2:], 8 if digits[1] == "o" else 16)
        else:
            value = int(digits, 10)
    except ValueError:
        _refuse(loader, node, f"cannot read {clip(text, 60)!r} as an integer")
    return -value if text.startswith("-") else value


def _construct_float(loader: _SceneLoader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node).strip()
    special = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}
    if text.lower() in special:
        return special[text.lower()]
    if len(text) > 2 * MAX_INT_DIGITS:
        _refuse(loader, node, f"a number of {len(text)} characters is too long")
    try:
        return float(text)
    except ValueError:
        _refuse(loader, node, f"cannot read {clip(text, 60)!r} as a number")


def _construct_leading_zero(loader: _SceneLoader, node: yaml.ScalarNode):
    text = node.value
    digits = text.lstrip("+-")
    if len(digits) > MAX_INT_DIGITS:
        _refuse(loader, node, f"an integer of {len(digits)} digits is too long")
    octal = f" (or 0o{digits.lstrip('0')} for octal)" if set(digits) <= set("01234567") else ""
    _refuse(loader, node, f"{text} has a leading zero, which YAML 1.1 reads as octal and YAML 1.2 as decimal: "
                          f"write {text[:len(text) - len(digits)]}{int(digits, 10)}{octal}")


def _construct_unsupported(loader: _SceneLoader, node: yaml.Node):
    _refuse(loader, node, f"the YAML tag {node.tag.replace('tag:yaml.org,2002:', '!!')} is not allowed in a scene "
                          "(use plain lists, mappings, numbers and strings)")


_SceneLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_SceneLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_SceneLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)
_SceneLoader.add_constructor(_LEADING_ZERO_TAG, _construct_leading_zero)
for _tag in ("set", "omap", "pairs", "binary", "timestamp", "value", "merge"):
    _SceneLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _construct_unsupported)


def parse_yaml(text: str):
    """YAML text -> Python data with the scene loader (safe, YAML 1.2 core schema, bounded, no duplicate keys).

    Raises yaml.YAMLError for anything it refuses."""
    try:
        return yaml.load(text, Loader=_SceneLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError as exc:  # a safety net: MAX_YAML_DEPTH keeps the composer far from Python's limit
        raise yaml.YAMLError(f"nested too deeply ({exc})") from None


def yaml_problem(exc: yaml.YAMLError, source: str = "") -> str:
    """One line for a YAML error: ``source:line:column: YAML syntax error: problem`` (the place when known)."""
    mark = getattr(exc, "problem_mark", None)
    problem = " ".join((getattr(exc, "problem", None) or str(exc)).split())
    if mark is None:
        return f"{source}: YAML syntax error: {problem}" if source else f"YAML syntax error: {problem}"
    if source:
        return f"{source}:{mark.line + 1}:{mark.column + 1}: YAML syntax error: {problem}"
    return f"YAML syntax error at column {mark.column + 1}: {problem}"


def read_yaml(path: Path, *, key: str = "", what: str = "scene file", max_bytes: int = MAX_SCENE_BYTES,
              holds: str = "a mapping of sections") -> dict:
    """The mapping in a YAML file (a scene file; a sweep file with ``key="SWEEP", what="sweep file"``): ConfigError at
    ``key`` for a missing/unreadable/special/oversized/non-UTF-8 file, bad syntax (line and column), an empty file
    or a non-mapping."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError as exc:
        raise ConfigError(key, f"{what} not found: {path}") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(key, f"cannot read {what} {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(key, f"{what} {path} is not a regular file")
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise ConfigError(key, f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:
        raise ConfigError(key, f"{what} {path} is larger than {max_bytes >> 20} MiB: not a {what}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(key, f"{what} {path} is not UTF-8 text (byte {exc.start})") from exc
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(key, yaml_problem(exc, str(path))) from None
    if data is None:
        raise ConfigError(key, f"{what} {path} is empty")
    if not isinstance(data, dict):
        raise ConfigError(key, f"{what} {path} must hold {holds}, got {type(data).__name__}")
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
            raise ConfigError(f"--set {key}", f"cannot parse value {clip(text, 80)!r}: {yaml_problem(exc)}") from None
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


_SHORT = reprlib.Repr()  # a bounded repr: a huge offending value is never rendered whole
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxset, _SHORT.maxtuple = 2, 4, 4, 4, 4
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = 60


def _show(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    text = _num(value) if isinstance(value, float) else _SHORT.repr(value)
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
    if kind in ("item_count", "grid_size", "output_dir"):  # our own PydanticCustomErrors carry a complete message
        return [], err["msg"]
    if kind == "unknown_key":
        return [ctx["key"]], ctx["hint"].join(("unknown key (", ")"))
    if kind == "too_short":
        return [], f"must have at least {ctx.get('min_length')} items, got {ctx.get('actual_length')}"
    if kind == "too_long":
        return [], f"must have at most {ctx.get('max_length')} items, got {ctx.get('actual_length')}"
    if kind in ("literal_error", "enum"):  # a Literal or one of the enums of diffmpm_cli/enums.py
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
        tags = [t.model_fields["shape"].annotation.__args__[0] for t in (*SHAPE_TYPES, GaussianSource)]
    else:
        tags = ["orbit", "pinhole", "capture"]
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


class _SceneDumper(yaml.SafeDumper):
    """SafeDumper that also quotes the strings the scene loader would type (``1e3``, ``010``, ``0o7``): the text
    reads back the same with this loader and with ``yaml.safe_load`` (YAML 1.1's ``yes``, ``1:30`` stay quoted)."""


for _tag, _pattern, _first in _CORE_SCHEMA:
    _SceneDumper.add_implicit_resolver(_tag, re.compile(_pattern), _first)


def dump_scene(scene: Scene) -> str:
    """The resolved scene as YAML; ``scene_from_dict(parse_yaml(text), ...)`` gives back an equal Scene (and so does
    ``yaml.safe_load``)."""
    return yaml.dump(scene.model_dump(mode="json"), Dumper=_SceneDumper, sort_keys=False, default_flow_style=None,
                     width=120)


def iter_shapes(shape, key: str):
    """(key path, shape) for a shape and all its parts, depth first."""
    yield key, shape
    for i, part in enumerate(getattr(shape, "parts", None) or []):
        yield from iter_shapes(part, f"{key}.parts[{i}]")


def _resolve_paths(scene: Scene, base_dir: Path) -> None:
    roots = [("source", scene.source)] + ([("target.mesh", scene.target.mesh)] if scene.target.mesh else [])
    for root_key, root in roots:
        for key, shape in iter_shapes(root, root_key):
            if isinstance(shape, (MeshFile, GaussianSource)):
                shape.path = str(_existing_file(base_dir, shape.path, f"{key}.path"))
    for i, image in enumerate(scene.target.images):
        image.path = str(_existing_file(base_dir, image.path, f"target.images[{i}].path"))
        if image.mask is not None:
            image.mask = str(_existing_file(base_dir, image.mask, f"target.images[{i}].mask"))
    for i, sequence in enumerate(scene.target.sequences):
        key = f"target.sequences[{i}]"
        if is_video(sequence.path):
            sequence.path = str(_existing_file(base_dir, sequence.path, f"{key}.path"))
        else:  # a glob: anchored at the scene's folder, matched when the pictures are read (assets)
            sequence.path = _anchored_glob(base_dir, sequence.path, f"{key}.path")
        if sequence.masks is not None:
            if is_video(sequence.masks):
                raise ConfigError(f"{key}.masks", "must be a glob of pictures, not a video")
            sequence.masks = _anchored_glob(base_dir, sequence.masks, f"{key}.masks")
    for i, cam in enumerate(scene.render.cameras):
        if cam.type == "capture":
            cam.path = str(_existing_path(base_dir, cam.path, f"render.cameras[{i}].path"))


def _anchored_glob(base_dir: Path, pattern: str, key: str) -> str:
    """A glob pattern made absolute against ``base_dir`` (``~`` expanded); ConfigError for a NUL character."""
    if "\0" in pattern:
        raise ConfigError(key, "the pattern contains a NUL character")
    return str(base_dir / Path(pattern).expanduser())


def _existing_path(base_dir: Path, name: str, key: str) -> Path:
    """The absolute path of a folder or regular file named relative to ``base_dir`` (a capture: a COLMAP model
    folder or a camera file); ConfigError naming ``key`` otherwise."""
    if "\0" in name:
        raise ConfigError(key, "the file name contains a NUL character")
    try:
        path = (base_dir / Path(name).expanduser()).resolve()
        info = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(key, f"not found: {base_dir / name}") from None
    except (OSError, RuntimeError) as exc:
        raise ConfigError(key, f"cannot open {base_dir / name}: {getattr(exc, 'strerror', None) or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        return path
    return _existing_file(base_dir, name, key)


def _existing_file(base_dir: Path, name: str, key: str) -> Path:
    """The absolute path of a regular file named relative to ``base_dir``; ConfigError naming ``key`` otherwise
    (missing, a folder, FIFO or device, a symlink loop, a NUL character or an over-long name)."""
    if "\0" in name:
        raise ConfigError(key, "the file name contains a NUL character")
    try:
        path = (base_dir / Path(name).expanduser()).resolve()
        info = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(key, f"file not found: {base_dir / name}") from None
    except (OSError, RuntimeError) as exc:  # RuntimeError: Path.resolve's "Symlink loop" (Python < 3.13)
        raise ConfigError(key, f"cannot open {base_dir / name}: {getattr(exc, 'strerror', None) or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(key, f"not a regular file: {path}")
    return path
