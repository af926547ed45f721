"""Python's cycle collector out of the timed path.

A full (generation-2) collection walks every tracked object: after torch, Warp and the CLI's libraries are imported
that is ~0.2-0.3 M objects, which took 75 ms on the H100 machine's CPU (measured, 2026-11-26) and landed in one
optimisation iteration out of a handful, stalling the GPU (a 1M-particle forward+backward took 255 instead of
196 ms whenever it did). ``frozen_heap()`` moves everything that exists when it starts (the imported modules, the
scene, the built pipeline) to the collector's permanent generation, so later collections walk only what the run
allocates itself; on leaving, those objects are handed back to the collector.
"""

from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def frozen_heap():
    """Freeze the heap for the block; nested or inside someone else's freeze, the outermost freezer unfreezes
    (the collector has one permanent generation: it cannot be handed back in parts)."""
    outermost = gc.get_freeze_count() == 0
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        if outermost:
            gc.unfreeze()
