#!/usr/bin/env bash
# On the GPU machine (after .gpu/b/unpack.sh, with .gpu/c staged: trimesh, pydantic, manifold3d, libigl):
# real-shape morphs at GPU size (issue #11), each judged against its exact mesh, into $OUT.
# RUNS lists "label scene [--set KEY=VALUE ...]" per line (default: the three shipped GPU scenes); each run's
# summary line goes to $OUT/morph.jsonl and its final/comparison.png to $OUT/<label>.png.
set -uo pipefail
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 3
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
RUNS=${RUNS:-"bunny scenes/sphere_to_bunny_gpu.yaml
spot scenes/sphere_to_spot_gpu.yaml
cat scenes/sphere_to_cat_gpu.yaml"}
while read -r label scene extra; do
  [ -z "$label" ] && continue
  # shellcheck disable=SC2086
  python3 -m diffmpm_cli optimize "$scene" --device cuda --out "/tmp/run_$label" --quiet --json $extra \
    > "/tmp/run_$label.json" 2> "/tmp/run_$label.log"
  python3 - "$label" "/tmp/run_$label" >> "$OUT/morph.jsonl" <<'PY'
import json, sys
label, run = sys.argv[1], sys.argv[2]
try:
    s = json.load(open(f"{run}/summary.json"))
except OSError as exc:
    print(json.dumps({"label": label, "error": str(exc)})); sys.exit()
f = s["final"]
keys = ["exact_iou_mean", "exact_iou_unseen_mean", "exact_missed_share", "exact_extra_share", "chamfer_exact",
        "silhouette_iou_mean", "inverted_share_any_step", "clumped_share", "det_F_min_any_step", "physically_valid"]
print(json.dumps({"label": label, "wall_s": s.get("wall_s"), "iterations": s.get("iterations"),
                  "target_gaussians": s.get("target_gaussians_exact_iou_mean"), **{k: f.get(k) for k in keys}}))
PY
  cp "/tmp/run_$label/final/comparison.png" "$OUT/$label.png" 2>/dev/null
  tail -1 "$OUT/morph.jsonl"
done <<< "$RUNS"
