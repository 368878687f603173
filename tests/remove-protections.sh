#!/usr/bin/env bash
# Each fault test of tests/test_faults.py run with the protection it covers taken out of the code: every one must
# fail. Run from the repository root with the venv active (`make test` builds it), one mutation at a time; each file
# is restored from a copy afterwards, and a file that is not restored is reported. Takes ~25 min on 2 cores.
#   bash tests/remove-protections.sh [NAME ...]      # default: every mutation below
# Output: one line per mutation (pytest's verdict), logs in runs/remove-protections/.
set -uo pipefail
cd "$(dirname "$0")/.."
out=runs/remove-protections
mkdir -p "$out"

# name | file | the protecting line(s) | what replaces them | the tests that must fail
mutations=(
  "no-retry|raysvc/storage.py|    if not loc.is_s3:\n        return fn()|    if True:\n        return fn()|restarted or gone_past"
  "no-preflight|raysvc/data/streaming/shards.py|    for rec in manifest.shards:\n        loc = root.join(rec.name)\n        with explained|    for rec in []:\n        loc = root.join(rec.name)\n        with explained|corrupted_on_s3"
  "no-checksum|raysvc/data/streaming/shards.py|    if verify_checksum and sha256_hex(data) != rec.sha256:|    if False and sha256_hex(data) != rec.sha256:|corrupted_on_s3"
  "no-space-check|raysvc/train/worker.py|            if free < size + SPACE_MARGIN_BYTES:|            if False:|disk_full"
  # a replica that starts once only (a marker file), so Serve cannot bring the killed one back
  "no-replica-restart|raysvc/serve/app.py|        self.cfg = ServeConfig.model_validate(config)\n|        self.cfg = ServeConfig.model_validate(config)\n        import pathlib\n        if pathlib.Path(\"$PWD/$out/replica-started\").exists():\n            raise RuntimeError(\"mutation: a restarted replica cannot start\")\n        pathlib.Path(\"$PWD/$out/replica-started\").touch()\n|replica_killed"
)

for m in "${mutations[@]}"; do
  IFS='|' read -r name file old new tests <<< "$m"
  if [[ $# -gt 0 && ! " $* " =~ " $name " ]]; then continue; fi
  git diff --quiet -- "$file" || { echo "$name: $file has local changes; skipped"; continue; }
  cp "$file" "$out/original"
  rm -f "$out/replica-started"
  python - "$file" "$old" "$new" <<'PY'
import sys

path, old, new = sys.argv[1], *(a.encode().decode("unicode_escape") for a in sys.argv[2:])
text = open(path).read()
assert text.count(old) == 1, f"{path}: the protected code was not found once: {old!r}"
open(path, "w").write(text.replace(old, new))
PY
  python -m pytest -q -p no:cacheprovider tests/test_faults.py -k "$tests" > "$out/$name.log" 2>&1
  rc=$?
  cp "$out/original" "$file"
  git diff --quiet -- "$file" || echo "$name: $file NOT restored"
  verdict=$(tail -n 1 "$out/$name.log")
  if [[ $rc -ne 0 ]]; then echo "$name: the tests fail as they must ($verdict)"; else echo "$name: PASSED WITHOUT ITS PROTECTION ($verdict)"; fi
done
