#!/usr/bin/env bash
# Join this machine to a running Ray cluster as a worker node (step 2 of README.md).
#
#   examples/cluster/start_worker.sh HEAD_IP:6379
#   examples/cluster/start_worker.sh HEAD_IP:6379 --num-gpus 4
#
# Extra arguments go to `ray start` unchanged. This machine needs the same Python environment as the
# head (same raysemi, torch and Ray versions), the search's --storage mounted at the same path, and
# the head's authentication token: copy the head's ~/.ray/auth_token here, or set RAY_AUTH_TOKEN.
# (Ray turns token authentication on by itself for a head that has a token, but not for a worker:
# this script does, when it finds a token.)
set -euo pipefail
if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: $0 HEAD_IP:PORT [ray start flags...]" >&2
    exit 2
fi
address=$1
shift
if [[ -z "${RAY_AUTH_MODE:-}" ]]; then
    if [[ -n "${RAY_AUTH_TOKEN:-}" || -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]]; then
        export RAY_AUTH_MODE=token
    else
        echo "note: no Ray authentication token here; if the head uses one, copy its ~/.ray/auth_token here" >&2
    fi
fi
exec ray start --address "$address" --disable-usage-stats "$@"
