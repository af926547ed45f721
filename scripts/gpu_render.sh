#!/usr/bin/env bash
# On the GPU machine (after .gpu/b/unpack.sh, with gsplat 1.5.3 staged): CUDA render tests, the gsplat comparison,
# a kernel-level profile and the render benchmarks into $OUT.
set -uo pipefail
export PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 3
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -c "import gsplat; print('gsplat', gsplat.__version__)"
t() { python3 -m pytest -q -m gpu -s -p no:cacheprovider "$@" 2>&1 | tail -6; }
{ t tests/test_render.py -k "not capture"; t tests/test_gsplat.py; t tests/test_render.py -k capture; } | tee "$OUT/tests_gpu_render.txt"
python3 scripts/profile_render.py 1000000 1024 1024 > "$OUT/profile_1M_1024.txt" 2>&1; head -30 "$OUT/profile_1M_1024.txt"
bench() { python3 -m diffmpm_cli bench render --device cuda --compare-gsplat "$@"; }
bench --gaussians 1000000 --size 1024x1024 --json > "$OUT/render_1M_1024.json"
bench --gaussians 100000 --size 1024x1024 --json > "$OUT/render_100k_1024.json"
bench --gaussians 1000000 --size 1920x1080 --json > "$OUT/render_1M_1080p.json"
