"""Pictures for run outputs: PNGs, labelled comparison grids, loss curves and animations (Pillow and numpy only).

Images are [H,W,C] arrays or torch tensors, C = 1, 3 or 4, float in [0,1] (uint8 arrays are taken as they are).
MP4 output additionally needs ``imageio`` with its ffmpeg plugin; GIF needs nothing more.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .files import atomic_write

MP4_MISSING = 'mp4 needs imageio-ffmpeg (pip install "diffmpm[video]")'
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
CURVE_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def to_uint8(image) -> np.ndarray:
    """A uint8 numpy [H,W,3] copy of an image [H,W,C] (or [H,W]): floats in [0,1] are clipped and scaled by 255.

    Gray (C = 1 or no channel axis) is replicated to RGB; an alpha channel (C = 4) is dropped.
    """
    if hasattr(image, "detach"):  # torch tensor, without importing torch here
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"image has shape {image.shape}, expected [H, W, C] with C = 1, 3 or 4")
    if image.dtype != np.uint8:
        image = np.nan_to_num(image.astype(np.float64), nan=0.0)
        image = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    image = image[:, :, :3]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image)


def save_png(path, image) -> Path:
    """Write ``image`` (see :func:`to_uint8`) as a PNG, atomically; makes parent folders. Returns ``path``."""
    picture = Image.fromarray(to_uint8(image))
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def _font():
    """Pillow's built-in default font."""
    return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    """(width, height) in pixels of ``text``."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def comparison_grid(rows: list[list], *, labels: list[str], scale: int = 1, separator: int = 2) -> np.ndarray:
    """A uint8 [H,W,3] sheet of images: one row per view, one column per label (e.g. target | initial | final).

    Images are upscaled ``scale`` times (nearest neighbour) and laid out in cells the size of the largest image,
    ``separator`` white pixels apart, under a header strip with the column labels.
    """
    if scale < 1:
        raise ValueError("scale must be >= 1")
    images = [[to_uint8(image).repeat(scale, axis=0).repeat(scale, axis=1) for image in row] for row in rows]
    columns = max([len(row) for row in images] + [len(labels)])
    if columns == 0:
        raise ValueError("comparison_grid needs at least one image or label")
    cell_h = max([image.shape[0] for row in images for image in row], default=1)
    cell_w = max([image.shape[1] for row in images for image in row], default=1)
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    header = (max([_text_size(probe, label, font)[1] for label in labels], default=0) + 6) if labels else 0
    width = columns * cell_w + (columns - 1) * separator
    height = header + len(images) * cell_h + max(len(images) - 1, 0) * separator
    sheet = Image.new("RGB", (width, max(height, 1)), WHITE)
    draw = ImageDraw.Draw(sheet)
    for c, label in enumerate(labels):
        text_w, _ = _text_size(draw, label, font)
        x = c * (cell_w + separator) + max(0, (cell_w - text_w) // 2)
        draw.text((x, 2), label, fill=BLACK, font=font)
    for r, row in enumerate(images):
        for c, image in enumerate(row):
            sheet.paste(Image.fromarray(image), (c * (cell_w + separator), header + r * (cell_h + separator)))
    return np.asarray(sheet, dtype=np.uint8).copy()


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` evenly spaced values from ``low`` to ``high`` on a 1, 2, 5 x 10^k step."""
    span = high - low
    if span <= 0:
        return [low]
    raw = span / max(count - 1, 1)
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if m * step >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _number(value: float) -> str:
    """A short label for an axis value."""
    return f"{value:.0f}" if abs(value - round(value)) < 1e-9 and abs(value) < 1e6 else f"{value:.3g}"


def loss_curves(history: list[dict[str, float]], path, *, keys: list[str] | None = None,
                size: tuple[int, int] = (640, 400)) -> Path:
    """Plot each loss in ``history`` over the iterations on a log10 y axis and write the picture as a PNG.

    history: one dict per iteration; x is ``entry["iteration"]`` when present, else the index. keys: the entries to
    plot (default: every numeric key but "iteration", in order of appearance). Values that are missing, non-finite
    or not positive are skipped. size: (width, height) in pixels. Returns ``path``.
    """
    if keys is None:
        keys = []
        for entry in history:
            keys += [k for k, v in entry.items()
                     if k != "iteration" and k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool)]
    series = {}
    for key in keys:
        points = []
        for i, entry in enumerate(history):
            value, x = entry.get(key), entry.get("iteration", i)
            try:
                value, x = float(value), float(x)
            except (TypeError, ValueError):
                continue
            if math.isfinite(value) and value > 0 and math.isfinite(x):
                points.append((x, math.log10(value)))
        series[key] = points

    width, height = size
    picture = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(picture)
    font = _font()
    left, right, top, bottom = 64, width - 12, 12, height - 32  # plot area in pixels
    draw.rectangle((left, top, right, bottom), outline=BLACK)
    all_points = [p for points in series.values() for p in points]
    if not all_points:
        draw.text((left + 8, top + 8), "no data", fill=BLACK, font=font)
        return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))

    x_low, x_high = min(p[0] for p in all_points), max(p[0] for p in all_points)
    y_low, y_high = min(p[1] for p in all_points), max(p[1] for p in all_points)
    if x_high - x_low < 1e-12:
        x_low, x_high = x_low - 1, x_high + 1
    if y_high - y_low < 1e-12:
        y_low, y_high = y_low - 0.5, y_high + 0.5
    pad = 0.05 * (y_high - y_low)
    y_low, y_high = y_low - pad, y_high + pad

    def pixel(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_low) / (x_high - x_low) * (right - left),
                bottom - (y - y_low) / (y_high - y_low) * (bottom - top))

    # y ticks at whole decades when the range spans at least two of them, else at evenly spaced exponents
    decades = list(range(math.ceil(y_low), math.floor(y_high) + 1))
    for y in (decades if len(decades) >= 2 else _ticks(y_low, y_high, 4)):
        _, py = pixel(x_low, y)
        draw.line((left - 4, py, left, py), fill=BLACK)
        draw.line((left + 1, py, right - 1, py), fill=(225, 225, 225))
        label = f"1e{y:.0f}" if abs(y - round(y)) < 1e-9 else f"{10 ** y:.3g}"
        text_w, text_h = _text_size(draw, label, font)
        draw.text((left - 6 - text_w, py - text_h / 2 - 1), label, fill=BLACK, font=font)
    for x in _ticks(x_low, x_high, 6):
        px, _ = pixel(x, y_low)
        draw.line((px, bottom, px, bottom + 4), fill=BLACK)
        label = _number(x)
        text_w, _ = _text_size(draw, label, font)
        draw.text((px - text_w / 2, bottom + 6), label, fill=BLACK, font=font)
    caption = "iteration"
    text_w, _ = _text_size(draw, caption, font)
    draw.text(((left + right - text_w) / 2, bottom + 18), caption, fill=BLACK, font=font)

    legend_y = top + 6
    for k, (key, points) in enumerate(series.items()):
        color = CURVE_COLORS[k % len(CURVE_COLORS)]
        pixels = [pixel(x, y) for x, y in points]
        if len(pixels) >= 2:
            draw.line(pixels, fill=color, width=2)
        for px, py in pixels if len(pixels) <= 20 else []:
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=color)
        text_w, text_h = _text_size(draw, key, font)
        x0 = right - 30 - text_w
        draw.line((x0, legend_y + text_h / 2 + 1, x0 + 20, legend_y + text_h / 2 + 1), fill=color, width=3)
        draw.text((x0 + 24, legend_y), key, fill=BLACK, font=font)
        legend_y += text_h + 6
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def mp4_available() -> bool:
    """Whether ``imageio`` with its ffmpeg plugin (``imageio-ffmpeg``) can be imported, so MP4s can be written."""
    try:
        import imageio.v2  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return False
    return True


def write_animation(path, frames: list, *, fps: int = 12) -> list[Path]:
    """Write ``frames`` (images of one size, see :func:`to_uint8`) as an animation; returns the paths written.

    ``.gif``: a looping animated GIF (Pillow). ``.mp4``: H.264 through imageio-ffmpeg; RuntimeError without it.
    """
    path = Path(path)
    if not frames:
        raise ValueError("write_animation needs at least one frame")
    if fps <= 0:
        raise ValueError("fps must be positive")
    pictures = [to_uint8(frame) for frame in frames]
    if len({picture.shape for picture in pictures}) != 1:
        raise ValueError("all frames must have the same size")
    suffix = path.suffix.lower()
    if suffix == ".gif":
        images = [Image.fromarray(picture) for picture in pictures]
        duration = max(1, round(1000 / fps))  # ms per frame

        def write_gif(tmp: Path) -> None:
            images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0)

        return [atomic_write(path, write_gif)]
    if suffix == ".mp4":
        if not mp4_available():
            raise RuntimeError(MP4_MISSING)
        import imageio.v2 as imageio

        height, width = pictures[0].shape[:2]  # yuv420p needs even sizes: pad with the last row / column
        pad = ((0, height % 2), (0, width % 2), (0, 0))

        def write_mp4(tmp: Path) -> None:
            with imageio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p",
                                    macro_block_size=1) as writer:
                for picture in pictures:
                    writer.append_data(np.pad(picture, pad, mode="edge"))

        return [atomic_write(path, write_mp4)]
    raise ValueError(f"unsupported animation type {path.suffix!r} (use .gif or .mp4)")
