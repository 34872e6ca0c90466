#!/usr/bin/env bash
# Stop what the start_*.sh scripts started on this machine (step 6 of README.md):
#
#   examples/cluster/teardown.sh          # the MLflow server (if it runs here) and this machine's Ray node
#   examples/cluster/teardown.sh mlflow   # only the MLflow server
#   examples/cluster/teardown.sh ray      # only Ray (`ray stop`: every Ray process of this user here)
#
# Run it on every machine of the cluster; the head last. The MLflow server is found through the pid
# file start_mlflow.sh wrote in $MLFLOW_DIR (default ~/raysemi-mlflow); its data stays there.
set -euo pipefail
what=${1:-all}
case "$what" in all|mlflow|ray) ;; *) echo "usage: $0 [all|mlflow|ray]" >&2; exit 2 ;; esac

if [[ "$what" != ray ]]; then
    pidfile=${MLFLOW_DIR:-$HOME/raysemi-mlflow}/mlflow.pid
    if [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        pid=$(cat "$pidfile")
        # the server and every process under it: its job runner's workers outlive a server stopped alone
        descendants() { local c; for c in $(ps -o pid= --ppid "$1"); do echo "$c"; descendants "$c"; done; }
        pids=("$pid" $(descendants "$pid"))
        kill -TERM "${pids[@]}" 2>/dev/null || true
        for _ in $(seq 1 20); do kill -0 "${pids[@]}" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "${pids[@]}" 2>/dev/null || true
        echo "stopped the MLflow server (pid $pid and ${#pids[@]} processes in all)"
    fi
    rm -f "$pidfile"
fi
if [[ "$what" != mlflow ]]; then
    ray stop
fi
