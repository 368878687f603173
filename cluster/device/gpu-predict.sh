#!/usr/bin/env bash
# Batch prediction and evaluation with model actors on the GPU (Ray Data map_batches, one GPU per replica) against
# the single-process CPU path on the same events: agreement of the predictions and events/s. The GPU machine's image
# has no Ray, so `fetch` (on a machine with the package registry) builds a Ray wheel without its Java jar, RLlib,
# Serve and debug symbols (the transfer limit is 64 MiB) plus the jsonschema wheels Ray needs, into .rwhl/:
#   cluster/device/gpu-predict.sh fetch             # here
#   cluster/device/gpu-predict.sh MODEL_DIR [N]     # there (carry .whl .rwhl MODEL_DIR): N events (default 256)
# Results in $OUT (or runs/gpu-predict): predict-*.json, evaluate-*.json, summary.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
RAY=ray==2.60.0
if [[ "${1:-}" == fetch ]]; then
  tmp=$(mktemp -d) repo=$PWD
  dl=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  "${dl[@]}" -d "$tmp" "$RAY"
  "${dl[@]}" -d .rwhl jsonschema jsonschema-specifications referencing rpds-py
  (cd "$tmp" && mkdir x && cd x && unzip -q ../ray-*.whl && rm -rf ray/jars ray/rllib ray/serve ray/llm \
    ray/dashboard/client/build ray/tune/examples &&
    strip --strip-unneeded ray/_raylet.so ray/core/src/ray/gcs/gcs_server ray/core/src/ray/raylet/raylet &&
    python3 -c "
import csv, glob, os
rec = glob.glob('ray-*.dist-info/RECORD')[0]
rows = [r for r in csv.reader(open(rec)) if os.path.exists(r[0])]
csv.writer(open(rec, 'w', newline='')).writerows(rows)" &&
    zip -q -r -9 "$repo/.rwhl/$(basename ../ray-*.whl)" .)
  rm -rf "$tmp"
  grep -qx '/.rwhl/' .git/info/exclude 2>/dev/null || echo /.rwhl/ >> .git/info/exclude
  du -sh .rwhl
  exit 0
fi
model="$1"
events="${2:-256}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .rwhl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
out="${OUT:-runs/gpu-predict}"
work=$(mktemp -d)
mkdir -p "$out"
raysvc() { python3 -m raysvc.cli "$@"; }
raysvc data generate --events "$events" --seed 7 --out "$work/data" --shard-events 32 > /dev/null
for run in cpu:0 cuda:0 cuda:1; do
  dev=${run%:*} actors=${run#*:}
  echo "predict on $dev, $actors actor(s)"
  raysvc predict --model "$model" --data "$work/data" --out "$work/pred-$dev-$actors" --device "$dev" \
    --actors "$actors" > "$out/predict-$dev-$actors.json"
done
for run in cpu:0 cuda:1; do
  dev=${run%:*} actors=${run#*:}
  echo "evaluate on $dev, $actors actor(s)"
  raysvc evaluate --model "$model" --data "$work/data" --device "$dev" --actors "$actors" \
    --out "$out/evaluate-$dev-$actors.json" > /dev/null
done
python3 - "$work" "$out" <<'PY'
import json, sys
from pathlib import Path
import numpy as np, pyarrow.parquet as pq
work, out = Path(sys.argv[1]), Path(sys.argv[2])
def preds(name):
    m = json.loads((work / name / "manifest.json").read_text())
    t = [pq.read_table(work / name / f) for f in m["files"]]
    ids = np.concatenate([x.column("event_id").to_numpy() for x in t])
    pred = np.concatenate([np.concatenate(x.column("pred").to_numpy(zero_copy_only=False)) for x in t])
    return m, ids, pred
base_m, base_ids, base = preds("pred-cpu-0")
summary = {"events": base_m["events"], "points": base_m["points"], "cpu_single_s": base_m["seconds"]}
for name in ("pred-cuda-0", "pred-cuda-1"):
    m, ids, pred = preds(name)
    key = name[5:].replace("-", "_")
    summary[f"{key}_s"] = m["seconds"]
    summary[f"{key}_same_event_order"] = bool(np.array_equal(ids, base_ids))
    summary[f"{key}_point_agreement_vs_cpu"] = float((pred == base).mean()) if len(pred) == len(base) else None
    summary[f"{key}_speedup_vs_cpu_single"] = base_m["seconds"] / m["seconds"]
ev = {r: json.loads((out / f"evaluate-{r}.json").read_text()) for r in ("cpu-0", "cuda-1")}
summary["evaluate_miou"] = {r: e.get("miou") for r, e in ev.items()}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
PY
