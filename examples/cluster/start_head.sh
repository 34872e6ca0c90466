#!/usr/bin/env bash
# Start the Ray head node on this machine (step 1 of README.md).
#
#   examples/cluster/start_head.sh                     # port 6379, all CPUs and GPUs of this machine
#   RAY_PORT=6380 examples/cluster/start_head.sh --num-cpus 4 --num-gpus 2
#
# Extra arguments go to `ray start` unchanged (see `ray start --help`). Ray prints the address that
# workers join with (HEAD_IP:PORT), which is also what `python -m raysemi.search --address` takes.
#
# Token authentication (Ray 2.60 has it; older Rays ignore it) is switched on: the token is $RAY_AUTH_TOKEN, else the file
# $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, generated there when there is none. Every worker and
# every driver needs the same token (start_worker.sh says how).
set -euo pipefail
if [[ -z "${RAY_AUTH_MODE:-}" ]]; then
    export RAY_AUTH_MODE=token
fi
if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}" && ! -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]]; then
    ray get-auth-token --generate > /dev/null
    echo "generated a Ray authentication token in ~/.ray/auth_token: copy it to every worker node" >&2
fi
exec ray start --head --port "${RAY_PORT:-6379}" --disable-usage-stats "$@"
