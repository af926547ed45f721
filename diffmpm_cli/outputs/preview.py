"""Preview pictures of particles from the scene's cameras (z-buffered discs, shaded by depth)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SOURCE_RGB = (0.90, 0.55, 0.25)
TARGET_RGB = (0.25, 0.50, 0.90)
MIN_PREVIEW_HEIGHT = 256
MAX_DISC_RADIUS = 16  # px


def draw_particles(points: np.ndarray, *, viewmat: np.ndarray, K: np.ndarray, width: int, height: int,
                   spacing: float, rgb, background=(1.0, 1.0, 1.0)) -> np.ndarray:
    """An [height, width, 3] uint8 picture of particles drawn as discs about one particle spacing wide."""
    cam = points @ viewmat[:3, :3].T + viewmat[:3, 3]
    cam = cam[cam[:, 2] > 1e-6]
    image = np.empty((height, width, 3), dtype=np.float64)
    image[:] = background
    if len(cam) == 0:
        return (image * 255).round().astype(np.uint8)
    z = cam[:, 2]
    u = K[0, 0] * cam[:, 0] / z + K[0, 2]
    v = K[1, 1] * cam[:, 1] / z + K[1, 2]
    # a disc about one particle spacing wide, at most MAX_DISC_RADIUS px (a narrow field of view magnifies it)
    radius = int(np.clip(np.ceil(0.6 * K[0, 0] * spacing / np.median(z)), 1, MAX_DISC_RADIUS))
    zbuf = np.full(height * width, np.inf)
    offsets = [(dx, dy) for dx in range(-radius, radius + 1) for dy in range(-radius, radius + 1)
               if dx * dx + dy * dy <= radius * radius]
    for dx, dy in offsets:
        col = np.floor(u).astype(np.int64) + dx
        row = np.floor(v).astype(np.int64) + dy
        keep = (col >= 0) & (col < width) & (row >= 0) & (row < height)
        np.minimum.at(zbuf, row[keep] * width + col[keep], z[keep])
    hit = np.isfinite(zbuf)
    near, far = z.min(), z.max()
    shade = 1.0 - 0.6 * (zbuf[hit] - near) / max(far - near, 1e-9)
    flat = image.reshape(-1, 3)
    flat[hit] = np.asarray(rgb)[None, :] * shade[:, None]
    return (image * 255).round().astype(np.uint8)


def check_preview_dir(out_dir: Path) -> None:
    """Refuse (ConfigError on ``--preview``) a folder that cannot be written: an existing file, a place without
    write permission. Called before any work, so nothing is written for a refused command."""
    from ..errors import ConfigError

    out_dir = Path(out_dir)
    existing = next((p for p in (out_dir, *out_dir.parents) if p.exists()), None)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError("--preview", f"{out_dir} exists and is not a folder")
    if existing is not None and not existing.is_dir():
        raise ConfigError("--preview", f"cannot create {out_dir}: {existing} is not a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError("--preview", f"cannot write into {existing}: permission denied")


def write_previews(*, assets, cameras, out_dir: Path, max_views: int = 4) -> list[Path]:
    """One PNG per camera (up to ``max_views``): source particles, and target particles beside them if any.

    Raises ConfigError (``--preview``) when the folder cannot be created or written."""
    from ..errors import ConfigError
    from .files import slug

    out_dir = Path(out_dir)
    check_preview_dir(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError("--preview", f"cannot create {out_dir}: {exc.strerror or exc}") from None
    scale = max(1.0, MIN_PREVIEW_HEIGHT / cameras.height)
    width, height = round(cameras.width * scale), round(cameras.height * scale)
    bodies = [("source", assets.source, SOURCE_RGB)]
    if assets.target is not None:
        bodies.append(("target", assets.target, TARGET_RGB))
    written = []
    for c, name in enumerate(cameras.names[:max_views]):
        K = cameras.Ks[c].copy()
        K[:2] *= scale
        panels = []
        for label, body, rgb in bodies:
            pixels = draw_particles(body.positions.numpy().astype(np.float64), viewmat=cameras.viewmats[c], K=K,
                                    width=width, height=height, spacing=assets.spacing, rgb=rgb)
            panel = Image.fromarray(pixels)
            ImageDraw.Draw(panel).text((6, 4), f"{label} ({body.particle_count} particles) - {name}", fill=(0, 0, 0))
            panels.append(panel)
        sheet = Image.new("RGB", (width * len(panels), height), (255, 255, 255))
        for i, panel in enumerate(panels):
            sheet.paste(panel, (i * width, 0))
        path = out_dir / f"preview_{slug(name)}.png"  # a camera name from the scene never leaves out_dir
        try:
            sheet.save(path)
        except OSError as exc:
            raise ConfigError("--preview", f"cannot write {path}: {exc.strerror or exc}") from None
        written.append(path)
    return written
