#!/usr/bin/env bash
# On the GPU machine (after .gpu/b/unpack.sh, trimesh and manifold3d staged): the CUDA MPM tests and check-grad on
# CUDA for the default scene and the contact scene, into $OUT.
set -uo pipefail
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 3
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pytest -q tests/test_mpm.py -m gpu -p no:cacheprovider 2>&1 | tail -3
for s in sphere_to_snowman elastic_drop; do
  python3 -m diffmpm_cli check-grad scenes/$s.yaml --device cuda --json > "$OUT/checkgrad_cuda_$s.json" \
    2> "$OUT/checkgrad_cuda_$s.txt"
  tail -22 "$OUT/checkgrad_cuda_$s.txt"
done
