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
