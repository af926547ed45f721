"""Regenerate the target pictures of scenes/torus_appearance.yaml: the torus rendered by diffmpm's own pipeline with
a known appearance (colour, opacity, Gaussian size), saved as RGBA PNGs (alpha = the silhouette).

Run from the repository root: python scenes/images/make_images.py
"""

import math
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from diffmpm_cli.assets import build_assets
from diffmpm_cli.config import scene_from_dict
from diffmpm_cli.pipeline import Pipeline

TRUE_COLOR = [0.2, 0.6, 0.9]
TRUE_OPACITY = 0.75
SIGMA0_FACTOR = 1.92  # the true sigma0 relative to the scene's default (0.5 x the sample spacing): 0.96 x spacing

if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    raw = yaml.safe_load((here.parent / "torus_appearance.yaml").read_text())
    raw["target"] = {"truth": {"v0": [0.0, 0.0, 0.0]}}  # the pictures do not exist yet: render the source itself
    scene = scene_from_dict(raw, base_dir=here.parent)
    pipe = Pipeline(scene, build_assets(scene))
    params = {"color": torch.tensor(TRUE_COLOR),
              "opacity_logit": torch.tensor(math.log(TRUE_OPACITY / (1 - TRUE_OPACITY))),
              "log_sigma0": torch.tensor(math.log(pipe.sigma0 * SIGMA0_FACTOR))}
    with torch.no_grad():
        out = pipe.forward(params)
    for c, name in enumerate(pipe.camera_names):
        rgba = torch.cat([out.images[-1, c], out.alphas[-1, c]], dim=-1).clamp(0, 1)
        path = here / f"torus_{name}.png"
        Image.fromarray((rgba.numpy() * 255).round().astype(np.uint8), mode="RGBA").save(path)
        print("wrote", path)
