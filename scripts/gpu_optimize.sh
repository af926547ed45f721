#!/usr/bin/env bash
# On the GPU machine (after .gpu/b/unpack.sh, with trimesh and manifold3d staged): check-grad on CUDA, the
# per-iteration split of the default scene and of its GPU variant, and a short optimisation run, into $OUT.
set -uo pipefail
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 3
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
d() { python3 -m diffmpm_cli "$@"; }
d info | tail -4
d bench optimize scenes/sphere_to_snowman_gpu.yaml --device cuda --json > "$OUT/bench_optimize_gpu.json"
d bench optimize scenes/sphere_to_snowman.yaml --device cuda --json > "$OUT/bench_optimize_small.json"
d optimize scenes/sphere_to_snowman_gpu.yaml --device cuda --out /tmp/run_gpu --quiet --json > "$OUT/run_gpu.json"
cp /tmp/run_gpu/final/comparison.png "$OUT/run_gpu_comparison.png"; tail -c 600 "$OUT/run_gpu.json"; echo
d check-grad scenes/sphere_to_snowman.yaml --device cuda --json > "$OUT/checkgrad_cuda.json" 2> "$OUT/checkgrad_cuda.txt"
tail -26 "$OUT/checkgrad_cuda.txt"
