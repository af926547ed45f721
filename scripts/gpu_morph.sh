#!/usr/bin/env bash
# On the GPU machine (after .gpu/b/unpack.sh, with .gpu/c staged: trimesh, pydantic, manifold3d, libigl):
# the real-shape morphs at GPU size (issue #11), each judged against its exact mesh, into $OUT.
# SCENES="bunny spot cat" picks scenes/sphere_to_<name>_gpu.yaml.
set -uo pipefail
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 3
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
d() { python3 -m diffmpm_cli "$@"; }
for s in ${SCENES:-bunny spot cat}; do
  d optimize "scenes/sphere_to_${s}_gpu.yaml" --device cuda --out "/tmp/run_$s" --quiet --json \
    > "$OUT/run_${s}_gpu.json" 2> "/tmp/run_${s}_gpu.log"
  cp "/tmp/run_$s/final/comparison.png" "$OUT/${s}_gpu_comparison.png"
  tail -4 "/tmp/run_${s}_gpu.log"
done
