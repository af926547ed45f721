"""Camera files a splat user opens: the INRIA 3DGS ``cameras.json`` (what the trainer writes beside its PLY; viewers
such as SuperSplat and the INRIA SIBR viewer read it to jump to the training views)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..render.capture import inria_camera_entries
from .files import atomic_write
from .ply import UP_ROTATIONS


def write_inria_cameras(path, *, names, viewmats, Ks, width: int, height: int, up_axis: str = "y") -> Path:
    """Write cameras (viewmats [C, 4, 4] world -> camera, OpenCV; Ks [C, 3, 3] px at width x height) as an INRIA
    cameras.json, in the exported world of ``up_axis`` (the same turn as the PLYs). Returns ``path``."""
    entries = inria_camera_entries(names=names, viewmats=np.asarray(viewmats, np.float64), Ks=np.asarray(Ks, np.float64),
                                   width=width, height=height, up_matrix=UP_ROTATIONS[up_axis])
    text = json.dumps(entries, indent=1)
    return atomic_write(path, lambda tmp: tmp.write_text(text))
