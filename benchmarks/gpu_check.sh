#!/usr/bin/env bash
# The prepared device check of issue 7, in one command (the device machine is lent by the minute).
# In order of importance, each stage bounded so the whole check ends inside one device call:
#   1. the CUDA tests (tests/test_cuda_graph.py: capture of every strategy, captured == eager,
#      capture failure falls back);
#   2. the throughput table at the reference size (batch 24, 256x256, 7 labeled patients, 20
#      validation volumes): CUDA graphs on, the same strategies with graphs off, and the reference
#      pipeline, all timed in the same run;
#   3. 4 mean-teacher trials packed on one GPU through raysemi.search;
#   4. mean teacher's validation Dice trajectory with graphs on (3 seeds);
#   5. raysemi.train on CUDA and a --resume of it;
#   6. torch.compile inside the captured step, on two strategies (last: exploratory).
# Results go to $OUT (JSON, logs). On the lent GPU machine, from the repo root:
#   source .gpu-bundle/install.sh && bash benchmarks/gpu_check.sh
# Locally, a CPU dry run of the same stages at a tiny size: DEVICE=cpu SMALL=1 bash benchmarks/gpu_check.sh
set -u -o pipefail
OUT=${OUT:-/tmp/gpu-check}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
# without an installed package, raysemi.search_spaces must sit inside raysemi/ (pyproject maps it there)
[ -e raysemi/search_spaces ] || ln -s ../search_spaces raysemi/search_spaces
WORK=$(mktemp -d)
if [ "${SMALL:-0}" = 1 ]; then
  PATIENTS=14; SIZE="64 64"; PATCH=64; BS=8; IT=10; REFIT=12; PACKIT=60; PACKEVAL=20; TRAINIT=40; EVAL=20; TRAJ=40
else
  PATIENTS=100; SIZE="256 216"; PATCH=256; BS=24; IT=100; REFIT=66; PACKIT=600; PACKEVAL=100; TRAINIT=200; EVAL=100; TRAJ=500
fi
log() { echo "== $(date +%T) $*"; }
# the whole check must end inside the device call's limit: each stage gets at most what is left
DEADLINE=${DEADLINE:-540}
left() { local l=$((DEADLINE - SECONDS - ${1:-0})); [ $l -lt 5 ] && l=5; [ $l -gt ${2:-9999} ] && l=$2; echo $l; }
{
log "machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
python3 -c "import torch, ray, optuna, mlflow; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'ray', ray.__version__, 'optuna', optuna.__version__, 'mlflow', mlflow.__version__)"
log "phantom ($PATIENTS patients, $SIZE)"
python3 -m raysemi.data phantom --out "$WORK/data" --patients $PATIENTS --size $SIZE --workers 16 || exit 1

log "1. CUDA tests"
timeout $(left 0 90) python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py -rs 2>&1 | tail -25
echo "tests exit: $?"

log "2. throughput table: graphs, eager, reference pipeline"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -lms 500 > "$OUT/gpu_util.csv" 2>/dev/null &
SMI=$!
timeout $(left 200) python3 benchmarks/throughput.py --device $DEVICE --data "$WORK/data" --size $PATCH --batch-size $BS \
  --warmup 20 --iterations $IT --repeats 2 --compare-eager --compare-reference-pipeline --reference-iterations $REFIT \
  --out "$OUT/throughput_$DEVICE.json"
echo "table exit: $?"

log "3. four packed mean-teacher trials through the search (graphs on)"
timeout $(left 90 120) python3 benchmarks/throughput.py --device $DEVICE --data "$WORK/data" --size $PATCH --batch-size $BS \
  --methods mean_teacher --packed 4 --packed-iterations $PACKIT --packed-eval-interval $PACKEVAL \
  --out "$OUT/throughput_${DEVICE}_packed4.json"
echo "packed exit: $?"
kill $SMI 2>/dev/null

log "4. mean teacher's Dice trajectory, graphs on"
timeout $(left 50 80) python3 benchmarks/trajectory.py --device $DEVICE --data "$WORK/data" --size $PATCH --batch-size $BS \
  --methods mt --iterations $TRAJ --points 5 --seeds 3 --pipelines ours --out "$OUT/trajectory_${DEVICE}_graphs.json"
echo "trajectory exit: $?"

log "5. train on $DEVICE, then resume"
timeout $(left 20 60) bash -c "python3 -m raysemi.train --method interpolation_consistency --data '$WORK/data' --device $DEVICE \
  --patch-size $PATCH $PATCH --batch-size $BS --labeled-bs $((BS / 2)) --max-iterations $((TRAINIT / 2)) \
  --eval-interval $EVAL --output '$WORK/run' --tracking-uri 'sqlite:///$WORK/mlflow.db' \
  && python3 -m raysemi.train --method interpolation_consistency --data '$WORK/data' --device $DEVICE \
  --patch-size $PATCH $PATCH --batch-size $BS --labeled-bs $((BS / 2)) --max-iterations $TRAINIT \
  --eval-interval $EVAL --output '$WORK/run' --resume '$WORK/run/last.pt' --tracking-uri 'sqlite:///$WORK/mlflow.db'" 2>&1 | tail -15
echo "train exit: $?"; cp "$WORK/run/results.json" "$OUT/train_results.json" 2>/dev/null

log "6. torch.compile inside the captured step"
timeout $(left 3) python3 benchmarks/throughput.py --device $DEVICE --data "$WORK/data" --size $PATCH --batch-size $BS \
  --methods mean_teacher,supervised --warmup 20 --iterations $IT --repeats 2 --compile --out "$OUT/throughput_${DEVICE}_compile.json"
echo "compile exit: $?"
log "done"
} 2>&1 | tee "$OUT/log.txt"
