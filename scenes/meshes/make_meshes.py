"""Regenerate the example meshes of scenes/ (run from anywhere: python scenes/meshes/make_meshes.py)."""

from pathlib import Path

import trimesh


def peanut() -> trimesh.Trimesh:
    """Two overlapping spheres along y: a 'peanut' of bounding box 0.26 x 0.46 x 0.26."""
    lobes = []
    for y in (-0.1, 0.1):
        lobe = trimesh.creation.icosphere(subdivisions=4, radius=0.13)
        lobe.apply_translation([0.0, y, 0.0])
        lobes.append(lobe)
    return trimesh.boolean.union(lobes, engine="manifold")


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    peanut().export(here / "peanut.obj")
    print(f"wrote {here / 'peanut.obj'}")
