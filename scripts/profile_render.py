"""Where the render's time goes on CUDA: every kernel of one forward and one backward, from torch's profiler.

    python3 scripts/profile_render.py [GAUSSIANS] [WIDTH] [HEIGHT] [PATH: auto|block|tile]
"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from diffmpm_cli.bench import _ours, render_scene

n, w, h = (int(a) for a in (sys.argv[1:4] if len(sys.argv) > 3 else (1_000_000, 1024, 1024)))
path = sys.argv[4] if len(sys.argv) > 4 else "auto"
inputs = render_scene(n, w, h, "cuda")
leaves = [t.clone().requires_grad_(True) for t in inputs[:4]]
for rep in range(3):
    for t in leaves:
        t.grad = None
    if rep == 2:
        prof = profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU])
        prof.__enter__()
    img, alpha, isects = _ours(*leaves, *inputs[4:], w, h, path=path)
    (img.sum() + alpha.sum()).backward()
    torch.cuda.synchronize()
prof.__exit__(None, None, None)
print(f"{n:,} Gaussians, {w}x{h}, {isects:,} intersections, path {path}")
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
