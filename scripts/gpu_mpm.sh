#!/usr/bin/env bash
# On the GPU machine (after .gpu/b/unpack.sh): install, run the CUDA tests and the MPM benchmarks into $OUT.
set -uo pipefail
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 3
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
python3 -m diffmpm_cli info --json > "$OUT/info.json"
python3 -m pytest -q tests/test_mpm.py -m gpu -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/tests_gpu.txt"
# bench ... FILE: the table (stderr) filtered onto the terminal, the JSON (stdout) into FILE
bench() { local f=${*: -1}; python3 -m diffmpm_cli bench mpm --device cuda "${@:1:$#-1}" --json 2> >(grep -E "particles|forward|kernels|peak" >&2) > "$f"; }
bench --particles 1000000 --grid 128 --steps 100 --backward-steps 100 --p2g plain "$OUT/mpm_1M_128_plain.json"
bench --particles 1000000 --grid 128 --steps 100 --backward-steps 100 "$OUT/mpm_1M_128.json"
bench --particles 1000000 --grid 128 --steps 100 --backward-steps 10 --sort-every 1 "$OUT/mpm_1M_128_sorted.json"
bench --particles 1000000 --grid 128 --steps 100 --backward-steps 50 --shuffle --sort-every 1 "$OUT/mpm_1M_128_shuffled_sorted.json"
bench --particles 1000000 --grid 128 --steps 100 --backward-steps 10 --shuffle --sort-every 8 "$OUT/mpm_1M_128_shuffled_sort8.json"
bench --particles 100000 --grid 128 --steps 100 --backward-steps 100 "$OUT/mpm_100k_128.json"
bench --particles 4000000 --grid 256 --steps 50 --backward-steps 20 --repeats 3 "$OUT/mpm_4M_256.json"
bench --particles 100000 --grid 64 --steps 20 --backward-steps 1000 --repeats 1 "$OUT/mpm_100k_1000steps.json"
