#!/usr/bin/env bash
# Start a local Ray head for raysvc with secure defaults: token auth on, the GCS, the dashboard (job API) and every
# other port bound to 127.0.0.1. Extra arguments go to `ray start` (e.g. --block, --num-cpus=2, port choices).
#
#   cluster/local/start-head.sh                 # then: see the commands it prints
#   cluster/local/stop-head.sh
#
# Environment: RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token; created with a random token, mode 600, if missing),
# RAYSVC_RAY_PORT (6379), RAYSVC_DASHBOARD_PORT (8265), RAYSVC_RAY_TEMP (/tmp/raysvc-ray), RAY (the ray binary).
set -euo pipefail

RAY=${RAY:-ray}
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
PORT=${RAYSVC_RAY_PORT:-6379}
DASH=${RAYSVC_DASHBOARD_PORT:-8265}
TEMP=${RAYSVC_RAY_TEMP:-/tmp/raysvc-ray}

if [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then
    mkdir -p "$(dirname "$RAY_AUTH_TOKEN_PATH")"
    (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' > "$RAY_AUTH_TOKEN_PATH")
    echo "raysvc: wrote a new Ray auth token to $RAY_AUTH_TOKEN_PATH (clients need RAY_AUTH_MODE=token and this file)"
fi

echo "raysvc: Ray head on 127.0.0.1:$PORT, dashboard and job API on http://127.0.0.1:$DASH (token auth)"
echo "  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH RAY_ADDRESS=http://127.0.0.1:$DASH"
echo "  ray job submit --working-dir . -- raysvc pretrain jobs/pretrain-panda-tiny.yaml"
exec "$RAY" start --head --port="$PORT" --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 \
    --dashboard-port="$DASH" --include-dashboard=true --temp-dir="$TEMP" "$@"
