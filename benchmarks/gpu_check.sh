#!/usr/bin/env bash
# The prepared device check of issue 7, in one command (the device machine is lent by the minute):
#   1. raysemi.train on CUDA (bf16 + channels_last) and a --resume of it;
#   2. the throughput table at the reference size (batch 24, 256x256, 7 labeled patients, 20
#      validation volumes) with the reference pipeline timed in the same run, and a profile;
#   3. 4 mean-teacher trials packed on one GPU through raysemi.search;
#   4. torch.compile measured on two strategies (last: it is the least important).
# Results go to $OUT (JSON, profile, log). On the lent GPU machine, from the repo root:
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
  PATIENTS=14; SIZE="64 64"; PATCH=64; BS=8; IT=10; REFIT=12; PACKIT=60; PACKEVAL=20; TRAINIT=40; EVAL=20
else
  PATIENTS=100; SIZE="256 216"; PATCH=256; BS=24; IT=100; REFIT=66; PACKIT=600; PACKEVAL=100; TRAINIT=300; EVAL=100
fi
log() { echo "== $(date +%T) $*"; }
# the whole check must end inside the device call's limit: each stage gets what is left
DEADLINE=${DEADLINE:-540}
left() { local l=$((DEADLINE - SECONDS - ${1:-0})); [ $l -lt 5 ] && l=5; echo $l; }
{
log "machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
python3 -c "import torch, ray, optuna, mlflow; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'ray', ray.__version__, 'optuna', optuna.__version__, 'mlflow', mlflow.__version__)"
log "phantom ($PATIENTS patients, $SIZE)"
python3 -m raysemi.data phantom --out "$WORK/data" --patients $PATIENTS --size $SIZE --workers 16 || exit 1

log "1. train on $DEVICE, then resume"
timeout 90 python3 -m raysemi.train --method mean_teacher --data "$WORK/data" --device $DEVICE \
  --patch-size $PATCH $PATCH --batch-size $BS --labeled-bs $((BS / 2)) --max-iterations $((TRAINIT * 2 / 3)) \
  --eval-interval $EVAL --mt-warmup 0 --output "$WORK/run" --tracking-uri "sqlite:///$WORK/mlflow.db" \
  && timeout 90 python3 -m raysemi.train --method mean_teacher --data "$WORK/data" --device $DEVICE \
  --patch-size $PATCH $PATCH --batch-size $BS --labeled-bs $((BS / 2)) --max-iterations $TRAINIT \
  --eval-interval $EVAL --mt-warmup 0 --output "$WORK/run" --resume "$WORK/run/last.pt" \
  --tracking-uri "sqlite:///$WORK/mlflow.db"
echo "train exit: $?"; cp "$WORK/run/results.json" "$OUT/train_results.json" 2>/dev/null

log "2. throughput table with the reference pipeline"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -lms 500 > "$OUT/gpu_util.csv" 2>/dev/null &
SMI=$!
timeout $(left 150) python3 benchmarks/throughput.py --device $DEVICE --data "$WORK/data" --size $PATCH --batch-size $BS \
  --iterations $IT --repeats 3 --compare-reference-pipeline --reference-iterations $REFIT --profile 10 \
  --out "$OUT/throughput_$DEVICE.json"
echo "table exit: $?"

log "3. four packed mean-teacher trials through the search"
timeout $(left 30) python3 benchmarks/throughput.py --device $DEVICE --data "$WORK/data" --size $PATCH --batch-size $BS \
  --methods mean_teacher --packed 4 --packed-iterations $PACKIT --packed-eval-interval $PACKEVAL \
  --out "$OUT/throughput_${DEVICE}_packed4.json"
echo "packed exit: $?"

kill $SMI 2>/dev/null
log "4. torch.compile"
timeout $(left 5) python3 benchmarks/throughput.py --device $DEVICE --data "$WORK/data" --size $PATCH --batch-size $BS \
  --methods supervised,mean_teacher --iterations $IT --repeats 3 --compile --out "$OUT/throughput_${DEVICE}_compile.json"
echo "compile exit: $?"
log "done"
} 2>&1 | tee "$OUT/log.txt"
