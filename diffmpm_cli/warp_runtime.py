"""Warp start-up (quiet, once) and the torch <-> Warp device names."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile

INIT_MESSAGES: list[str] = []  # what Warp's native library printed while starting (shown by `diffmpm info`)


@functools.cache
def warp():
    """The initialised ``warp`` module, its banner off and its native start-up notices kept in INIT_MESSAGES.

    On a machine without a CUDA driver Warp's C library prints a warning to the stderr file descriptor on every
    start; the CPU is the expected device there, so the notice is captured rather than shown on every command.
    """
    import warp as wp

    wp.config.log_level = wp.LOG_WARNING
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            wp.init()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        INIT_MESSAGES.extend(line for line in capture.read().decode(errors="replace").splitlines() if line.strip())
    return wp


def warp_device(torch_device) -> str:
    """Warp's name for a torch device ('cpu', 'cuda:0', ...)."""
    import torch

    device = torch.device(torch_device)
    if device.type == "cuda":
        name = f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
        _keep_pool(name)
        return name
    return "cpu"


@functools.cache
def _keep_pool(name: str) -> None:
    """Let Warp's CUDA memory pool keep what it has allocated (up to a quarter of the device) across
    synchronisations. CUDA's default threshold is 0: every synchronise hands the pool's memory back to the driver
    and the next allocation maps it again, which cost milliseconds per render at 1M Gaussians."""
    wp = warp()
    if wp.is_mempool_supported(name):
        wp.set_mempool_release_threshold(name, 0.25)


def torch_stream(device):
    """Context that runs Warp on torch's current stream for a CUDA device (nothing to do on the CPU)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return contextlib.nullcontext()
    wp = warp()
    # inside a graph capture, waiting on Warp's own (non-capturing) stream would invalidate the capture
    capturing = torch.cuda.is_current_stream_capturing()
    return wp.ScopedStream(warp_stream(torch.cuda.current_stream(device)), sync_enter=not capturing)


_STREAMS: dict = {}


def warp_stream(stream):
    """One Warp stream object per torch stream, kept: a Warp stream object unregisters its CUDA stream when it is
    collected, which would also drop a graph capture that Warp tracks on it."""
    wp = warp()
    key = (str(stream.device), stream.cuda_stream)
    if key not in _STREAMS:
        _STREAMS[key] = wp.stream_from_torch(stream)
    return _STREAMS[key]


@contextlib.contextmanager
def graph_capture(graph, stream):
    """Capture into a ``torch.cuda.CUDAGraph`` on a torch stream, with Warp told that the capture is under way
    (external capture), so that Warp's launches and allocations inside it are captured correctly too."""
    import torch

    wp = warp()
    w_stream = warp_stream(stream)
    with torch.cuda.graph(graph, stream=stream):
        wp.capture_begin(stream=w_stream, external=True)
        try:
            yield
        finally:
            wp.capture_end(stream=w_stream)
