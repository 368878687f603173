#!/usr/bin/env bash
# Stop the Ray processes that cluster/local/start-head.sh started (`ray stop` ends every Ray of this user on this
# machine; a head started with --block stops with its process instead).
set -euo pipefail
exec "${RAY:-ray}" stop "$@"
