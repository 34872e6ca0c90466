#!/usr/bin/env bash
# Start the MLflow tracking server that every search on the cluster logs to (step 3 of README.md).
#
#   examples/cluster/start_mlflow.sh                   # 0.0.0.0:5000, store in ~/raysemi-mlflow
#   MLFLOW_DIR=/data/mlflow MLFLOW_PORT=5001 examples/cluster/start_mlflow.sh
#
# Runs in the foreground (use tmux, or `nohup ... &`); its pid is written to $MLFLOW_DIR/mlflow.pid
# for teardown.sh. Runs and metrics go to a SQLite file, artifacts to $MLFLOW_DIR/artifacts: both
# local to this machine, since clients reach them over HTTP only (--artifacts-destination serves
# artifacts through the server). MLflow accepts requests addressed to localhost and private IPs
# only; to use a host name in --tracking-uri, set MLFLOW_ALLOWED_HOSTS (e.g. "head.example.org:5000").
# Extra arguments go to `mlflow server` unchanged.
set -euo pipefail
dir=${MLFLOW_DIR:-$HOME/raysemi-mlflow}
mkdir -p "$dir/artifacts"
dir=$(cd "$dir" && pwd)
extra=()
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
    extra+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi
echo $$ > "$dir/mlflow.pid"  # exec keeps the pid: this is the server's
exec mlflow server --backend-store-uri "sqlite:///$dir/mlflow.db" --artifacts-destination "$dir/artifacts" \
    --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-2}" \
    ${extra[@]+"${extra[@]}"} "$@"
