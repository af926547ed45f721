"""What produced a result: the device's name and the versions of diffmpm and its main dependencies (summary.json,
benchmark records)."""

from __future__ import annotations

import platform


def device_name(device: str) -> str:
    """The GPU's name for a CUDA device, else the processor's (or the machine type's)."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    """diffmpm, torch, Warp and Python versions."""
    import torch

    from . import __version__
    from .warp_runtime import warp

    return {"diffmpm": __version__, "torch": torch.__version__, "warp": warp().config.version,
            "python": platform.python_version()}
