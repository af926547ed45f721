"""Target pictures: read and decoded whole, with a pixel cap, so that a file `validate` accepts is one the run can use.

Pillow's ``verify()`` checks only a PNG's chunk checksums and decoding does not look at them: a stream that is
corrupt inside valid chunks fails only when decoded. Both are done here (validate and optimize call this).
"""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

from ..errors import AssetError

MAX_IMAGE_PIXELS = 8192 * 8192  # the largest render (render.width, render.height <= 8192)


def read_image(path: str, *, key: str, size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(rgb [H, W, 3], alpha [H, W, 1] or None) in [0, 1] (float32) of a PNG/JPEG file, decoded in full.

    ``alpha`` is the image's alpha channel (RGBA, LA, or a transparency entry), None when it has none. ``size``
    (width, height) [px], when given, must match. Raises AssetError naming ``key`` for a file that is not an image,
    is corrupt, is larger than MAX_IMAGE_PIXELS (a "decompression bomb" is refused before it is decoded) or has
    the wrong size.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.verify()  # chunk checksums (decoding does not look at them), without decoding
            with Image.open(path) as img:
                width, height = img.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise AssetError(key, f"image is {width}x{height} px, more than the largest render (8192x8192)")
                if size is not None and (width, height) != tuple(size):
                    raise AssetError(key, f"image is {width}x{height} px but render is {size[0]}x{size[1]}")
                has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
                data = np.asarray(img.convert("RGBA" if has_alpha else "RGB"), dtype=np.float32) / 255.0
    except AssetError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise AssetError(key, f"image is too large to decode: {exc}") from None
    except Exception as exc:  # Pillow's decoders raise many types (OSError, SyntaxError, ValueError, ...) on bad data
        raise AssetError(key, f"not a readable image: {path} ({type(exc).__name__}: {exc})") from None
    return data[..., :3], (data[..., 3:4] if has_alpha else None)


def fits(image_size: tuple[int, int], size: tuple[int, int]) -> bool:
    """Whether a picture of ``image_size`` (width, height) shows the view of a render of ``size`` at another scale:
    the same aspect ratio within one pixel of the render."""
    (w0, h0), (w, h) = image_size, size
    return abs(w * h0 / w0 - h) <= 1.0


def resize_area(data: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``data`` [H0, W0, ch] (float32) resampled to ``size`` = (width, height) by area averaging (Pillow's box filter
    per channel: each output pixel is the mean of the input pixels it covers); unchanged at its own size."""
    if (data.shape[1], data.shape[0]) == tuple(size):
        return data
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(data[..., c]), mode="F").resize(
        tuple(size), Image.Resampling.BOX), dtype=np.float32) for c in range(data.shape[-1])]
    return np.clip(np.stack(channels, axis=-1), 0.0, 1.0)


def read_mask(path: str, *, key: str, size: tuple[int, int]) -> np.ndarray:
    """A silhouette [H, W, 1] in [0, 1] from a greyscale (or RGB: its mean; or alpha-only) mask image of ``size``."""
    rgb, alpha = read_image(path, key=key)
    if (rgb.shape[1], rgb.shape[0]) != tuple(size):
        raise AssetError(key, f"mask is {rgb.shape[1]}x{rgb.shape[0]} px but its image is {size[0]}x{size[1]}")
    return rgb.mean(axis=-1, keepdims=True) if alpha is None or np.all(alpha == 1.0) else alpha


def load_picture(path: str, *, key: str, size: tuple[int, int] | None, mask: str | None = None, mask_key: str = "",
                 background=None, tolerance: float = 2.0 / 255.0, backdrop=None) -> tuple[np.ndarray, np.ndarray]:
    """(rgb [H, W, 3], alpha [H, W, 1]) in [0, 1] of a target picture at the render ``size`` = (W, H).

    The silhouette comes from ``mask`` (a separate greyscale image of the picture's size), else the picture's alpha,
    else pixels within ``tolerance`` (per channel) of ``background`` are background, else the picture is all object.
    It is found at the picture's own resolution, then picture and silhouette are area-averaged to ``size`` (the
    aspect ratios must agree within a pixel; None = the picture's own size). AssetError naming ``key`` (or
    ``mask_key``) otherwise. ``backdrop`` (RGB in [0, 1], the render's background): a picture with a ``mask`` is
    composited over it (alpha x picture + (1 - alpha) x backdrop), so that what lies outside the mask (a room, a
    table) is compared with the render's background, not with the object."""
    rgb, alpha = read_image(path, key=key)
    return fit_picture(rgb, alpha, key=key, size=size, mask=mask, mask_key=mask_key, background=background,
                       tolerance=tolerance, backdrop=backdrop)


def fit_picture(rgb: np.ndarray, alpha: np.ndarray | None, *, key: str, size: tuple[int, int] | None,
                mask: str | None = None, mask_key: str = "", background=None,
                tolerance: float = 2.0 / 255.0, backdrop=None) -> tuple[np.ndarray, np.ndarray]:
    """``load_picture`` for a decoded picture: rgb [H0, W0, 3] and alpha [H0, W0, 1] or None, in [0, 1]."""
    height0, width0 = rgb.shape[:2]
    size = (width0, height0) if size is None else size
    if not fits((width0, height0), size):
        fitted = max(1, round(size[0] * height0 / width0))
        raise AssetError(key, f"image is {width0}x{height0} px (aspect {width0 / height0:.4g}) but render is "
                              f"{size[0]}x{size[1]}: give a render size of the same aspect, e.g. {size[0]}x{fitted}")
    if mask is not None:
        if alpha is not None:
            raise AssetError(mask_key, "the image has an alpha channel too: give the silhouette once (drop the mask "
                                       "or the image's alpha)")
        alpha = read_mask(mask, key=mask_key, size=(width0, height0))
        if backdrop is not None:
            rgb = alpha * rgb + (1.0 - alpha) * np.asarray(backdrop, dtype=np.float32)
    elif alpha is None and background is not None:
        alpha = (np.abs(rgb - np.asarray(background, dtype=np.float32)).max(-1, keepdims=True) > tolerance)
        alpha = alpha.astype(np.float32)
    elif alpha is None:
        alpha = np.ones_like(rgb[..., :1])
    return resize_area(rgb, size), resize_area(alpha, size)
