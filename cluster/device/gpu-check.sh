#!/usr/bin/env bash
# The GPU check for a borrowed GPU machine whose image has torch, numba, pyarrow, scipy, scikit-learn and PyYAML but
# neither Ray nor pydantic (the `device` tool's nvidia-h200: Python 3.12). `raysvc bench gpu` needs no Ray; pydantic
# travels as wheels in .whl/ (git-ignored), fetched beforehand on a machine with the package registry:
#   cluster/device/gpu-check.sh fetch        # here: downloads the wheels, ignores .whl/ in git
#   cluster/device/gpu-check.sh [ARGS]       # there (carry .whl): installs them to /tmp/site, runs the bench;
#                                            # results in $OUT (or runs/): nvidia-smi.txt, bench-gpu.json
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEELS=(pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0)
if [[ "${1:-}" == fetch ]]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  ls .whl
  exit 0
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
out="${OUT:-runs}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/nvidia-smi.txt"
python3 -m raysvc.cli bench gpu --json --out "$out/bench-gpu.json" "$@" > /dev/null
python3 - "$out/bench-gpu.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for name, ok in r["checks"].items():
    print("ok  " if ok else "FAIL", name)
for key in ("seg_tiny", "seg_small", "panda_tiny", "panda_base"):
    print(key, {k: round(v, 4) for k, v in r.get(key, {}).items() if isinstance(v, float)})
print("all passed:", r["all_passed"])
PY
