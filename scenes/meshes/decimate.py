"""Decimate a third-party mesh for scenes/meshes/ (the processing recorded in README.md).

    python scenes/meshes/decimate.py SOURCE.obj OUT.obj FACES "# header line" ["# header line" ...]

Geometry only (no UVs, no normals), quadric decimation through trimesh (needs the `fast-simplification` package,
which diffmpm itself does not use), vertices merged by position first so that seams do not block collapses.
Boundary edges (holes) are kept by the decimation; the open-edge count before and after is printed.
"""

import sys

import numpy as np
import trimesh


def open_edges(mesh: trimesh.Trimesh) -> int:
    return int(np.sum(np.bincount(mesh.edges_unique_inverse) == 1))


def main(source: str, out: str, faces: int, header: list[str]) -> None:
    loaded = trimesh.load(source, force="mesh", process=True)
    mesh = trimesh.Trimesh(vertices=loaded.vertices, faces=loaded.faces, process=True)
    small = mesh.simplify_quadric_decimation(face_count=faces)
    print(f"{source}: {len(mesh.faces)} faces, {open_edges(mesh)} open edges -> "
          f"{out}: {len(small.faces)} faces, {open_edges(small)} open edges")
    text = trimesh.exchange.obj.export_obj(small, include_normals=False, include_color=False, include_texture=False,
                                           header=None, digits=6)
    with open(out, "w") as f:
        f.write("".join(line + "\n" for line in header) + text)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:])
