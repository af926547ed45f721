"""Scene configuration: the schema and its loader."""

from .load import apply_overrides, dump_scene, load_scene, scene_from_dict
from .schema import Scene

__all__ = ["Scene", "apply_overrides", "dump_scene", "load_scene", "scene_from_dict"]
