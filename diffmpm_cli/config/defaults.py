"""Generate configs/defaults.yaml from the schema: every key, its default and its documentation.

``python -m diffmpm_cli.config.defaults > configs/defaults.yaml`` (``make defaults``); a test fails when the
shipped file is stale. The file is itself a valid scene: ``source`` and ``target`` (required) hold examples.
"""

from __future__ import annotations

import yaml
from pydantic import BaseModel

from .schema import SHAPE_TYPES, OrbitRig, PinholeCamera, Scene, Section, ShapeBase, TargetConfig

EXAMPLES = {
    "source": {"shape": "sphere", "radius": 0.2, "center": [0.5, 0.5, 0.5]},
    "target": {"mesh": {"shape": "box", "size": [0.3, 0.3, 0.3], "center": [0.5, 0.5, 0.5]}},
}

HEADER = """\
# diffmpm scene defaults: every key, its default value and its meaning. Units: SI (m, s, kg, Pa), angles in deg.
# Generated from diffmpm_cli/config/schema.py by `make defaults`; do not edit by hand.
# A scene file only needs `source` and `target`; any other key left out takes the value below.
"""


def _scalar(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1000).strip().removesuffix("\n...").strip()


def _variant_doc(model: type[BaseModel], tag_key: str, indent: str, skip=()) -> list[str]:
    tag = model.model_fields[tag_key].annotation.__args__[0]
    doc = (model.__doc__ or "").strip().splitlines()[0]
    lines = [f"{indent}#   {tag_key}: {tag} - {doc}"]
    for name, field in model.model_fields.items():
        if name == tag_key or name in skip:
            continue
        default = "required" if field.is_required() else f"default {_scalar(field.get_default(call_default_factory=True))}"
        lines.append(f"{indent}#       {name} ({default}): {field.description}")
    return lines


def _shape_doc(indent: str) -> list[str]:
    lines = [f"{indent}# A shape is one of:"]
    for model in SHAPE_TYPES:
        lines += _variant_doc(model, "shape", indent, skip=ShapeBase.model_fields)
    lines.append(f"{indent}# and every shape takes:")
    for name, field in ShapeBase.model_fields.items():
        lines.append(f"{indent}#       {name} (default {_scalar(field.get_default())}): {field.description}")
    return lines


def _section(model: type[BaseModel], data: dict, indent: str) -> list[str]:
    lines = []
    for name, field in model.model_fields.items():
        note = " (required; this is an example)" if field.is_required() else ""
        if field.description:
            lines.append(f"{indent}# {field.description}{note}")
        if name == "source" or (model is TargetConfig and name == "mesh"):
            lines += _shape_doc(indent)
        if name == "cameras":
            lines.append(f"{indent}# A camera entry is one of:")
            lines += _variant_doc(OrbitRig, "type", indent) + _variant_doc(PinholeCamera, "type", indent)
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, Section):
            lines.append(f"{indent}{name}:")
            lines += _section(sub, data[name], indent + "  ")
        else:
            lines.append(f"{indent}{name}: {_scalar(data[name])}")
    return lines


def render_defaults() -> str:
    """The text of configs/defaults.yaml."""
    data = Scene.model_validate(EXAMPLES).model_dump(mode="json")
    lines = HEADER.splitlines()
    for line in _section(Scene, data, ""):
        if line.startswith("# ") and not lines[-1].startswith("#"):
            lines.append("")
        lines.append(line)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_defaults(), end="")
