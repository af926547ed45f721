"""Every CUDA-only code path compiles for an H100 (sm_90) on a machine without a GPU: Warp's bundled NVRTC turns each
kernel module into PTX (wp.compile_aot_module). The CPU suite runs the kernels' CPU paths only; this catches a CUDA
snippet (kernels/transfer.py's warp-aggregated adds, bounds.py's warp reductions, raster_block.py's block path) or a
kernel that fails to compile for the device before a GPU run does. Skipped where NVRTC is unavailable."""

from __future__ import annotations

import pytest

from diffmpm_cli.warp_runtime import warp

MODELS = [("fixed_corotated",), ("neo_hookean",), ("von_mises", "drucker_prager", "snow", "newtonian_fluid", "bingham")]


def kernels():
    from diffmpm_cli.kernels import bounds, mpm, raster_block, splat

    out = [bounds, splat, raster_block, mpm.grid_update]
    for order in mpm.BSPLINES:
        out += [mpm.p2g_transfer[order], mpm.g2p_gather[order], mpm.p2g_mass[order], bounds.particle_box(order)]
        for models in MODELS:
            out += [mpm.p2g(order, models), mpm.g2p(order, models), mpm.p2g_affine(order, models)]
    out += [mpm.g2p_update(models) for models in MODELS]
    out.append(mpm.g2p("quadratic", ("snow", "drucker_prager"), True))  # check-grad's linearised variant
    return out


def test_cuda_kernels_compile_for_sm90(tmp_path):
    wp = warp()
    try:
        wp.compile_aot_module(kernels()[0], arch=90, module_dir=tmp_path, use_ptx=True)
    except RuntimeError as exc:
        pytest.skip(f"no CUDA compiler here: {exc}")
    for kernel in kernels():
        module = kernel if not hasattr(kernel, "module") else kernel.module
        paths = wp.compile_aot_module(module, arch=90, module_dir=tmp_path, use_ptx=True)
        assert paths and all(p.stat().st_size > 0 for p in paths), kernel
