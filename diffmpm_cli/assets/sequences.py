"""Target sequences: the pictures of a glob (sorted by name) or the frames of a video, fitted to the render size.

Which step each picture shows is config/sequences.py's (values only); here the files are read. A video needs the
``video`` extra (imageio with imageio-ffmpeg); without it a video is refused with the install line.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator

import numpy as np

from ..config.sequences import is_video, sequence_steps
from ..errors import AssetError
from .images import fit_picture, read_image


def sequence_files(pattern: str, *, key: str) -> list[str]:
    """The files a glob matches, sorted by name; AssetError naming ``key`` when it matches none."""
    files = sorted(f for f in glob.glob(pattern) if not f.endswith("/"))
    if not files:
        raise AssetError(key, f"matches no file: {pattern}")
    return files


def _video_frames(path: str, *, key: str) -> Iterator[np.ndarray]:
    try:
        import imageio.v2 as iio
    except ImportError:
        raise AssetError(key, 'a video target needs imageio-ffmpeg (pip install "diffmpm[video]"); or give a glob of '
                              "pictures") from None
    try:
        reader = iio.get_reader(path, format="FFMPEG")
    except Exception as exc:  # noqa: BLE001 - imageio raises many types for a file it cannot open
        raise AssetError(key, f"not a readable video: {path} ({type(exc).__name__}: {exc})") from None
    with reader:
        try:
            for frame in reader:
                yield np.asarray(frame, dtype=np.float32)[..., :3] / 255.0
        except (OSError, RuntimeError, ValueError) as exc:
            raise AssetError(key, f"video {path} cannot be decoded ({type(exc).__name__}: {exc})") from None


def sequence_pictures(scene, index: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(step, rgb [H, W, 3], alpha [H, W, 1]) at the render size for every used picture of target.sequences[index];
    AssetError when the sequence has fewer pictures than the simulated time needs or a picture is bad."""
    sequence, target = scene.target.sequences[index], scene.target
    key = f"target.sequences[{index}]"
    steps = sequence_steps(scene, index)
    size = (scene.render.width, scene.render.height)
    masks = sequence_files(sequence.masks, key=f"{key}.masks") if sequence.masks is not None else None
    if is_video(sequence.path):
        pictures = ((f"{key}.path", frame, None) for frame in _video_frames(sequence.path, key=f"{key}.path"))
    else:
        files = sequence_files(sequence.path, key=f"{key}.path")
        pictures = ((f"{key}.path ({name})", *read_image(name, key=f"{key}.path")) for name in files)
    count = 0
    for count, (where, rgb, alpha) in enumerate(pictures, 1):
        if count > len(steps):
            break
        mask = None
        if masks is not None:
            if count > len(masks):
                raise AssetError(f"{key}.masks", f"has {len(masks)} pictures, fewer than the sequence's")
            mask = masks[count - 1]
        rgb, alpha = fit_picture(rgb, alpha, key=where, size=size, mask=mask, mask_key=f"{key}.masks",
                                 background=target.image_background, tolerance=target.image_background_tolerance,
                                 backdrop=scene.render.background)
        yield steps[count - 1], rgb, alpha
    else:
        if count < len(steps):
            raise AssetError(f"{key}.path", f"has {count} pictures, but {len(steps)} at {sequence.fps:g} per s span "
                                            f"the simulated {scene.sim.steps * scene.sim.dt:g} s: give more pictures, "
                                            "lower sim.steps or raise target.sequences.start")
