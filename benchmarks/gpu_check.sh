#!/usr/bin/env bash
# The prepared device check of issue 7 (the device machine is lent by the minute, at most 10 minutes
# a call). Stages, in order of importance; STAGES picks which run (default: all, in this order):
#   tests     the CUDA tests (tests/test_cuda_graph.py: every strategy captures, captured == eager,
#             a failed capture falls back, replays read each iteration's weight and learning rate);
#   compile   the throughput table at the reference size (batch 24, 256x256, 7 labeled patients,
#             20 validation volumes): CUDA graphs, the same with compile: on, and the reference
#             pipeline, all timed in the same run (METHODS, default all seven); the validation pass
#             with its metrics on threads and serially;
#   table     the same table with graphs on and off (eager) instead of compile;
#             both table stages train with the config values in SET (e.g. SET="uncertainty_copies=8
#             uncertainty_with_target=true"; the reference pipeline keeps the reference's own), and with
#             COMPARE="FIELD=VALUE ..." time each strategy again with those values, in the same process
#             (e.g. COMPARE="uncertainty_copies=2": an A/B of one setting);
#   variant   the table's first columns for VARIANT_METHODS (default uamt) with the config values
#             VARIANT (default "uncertainty_copies=8": UA-MT's T noisy passes in one teacher forward);
#   packed    4 mean-teacher trials packed on one GPU through raysemi.search (COMPILE=1: compile: on);
#   mps       the same under NVIDIA MPS (nvidia-cuda-mps-control -d, stopped after): without it the
#             trials' processes take turns on the GPU; with it their kernels can run side by side;
#   train     raysemi.train on CUDA, then a --resume of it (COMPILE=1: with --compile on);
#   trajectory mean teacher's validation Dice trajectory with graphs on (3 seeds; COMPILE=1: compile on);
#   trajectories  our path (bf16, channels_last, graphs) against TRAJ_PIPELINES (default fp32: our
#             feed with those switches off; 'reference' instead, or 'fp32,reference' for both: the
#             reference's CPU-bound feed, 12 it/s for mean teacher), 3 seeds, for each strategy of
#             TRAJ_METHODS (default dv,dan,uamt,supervised,em,ict; one JSON each, rewritten after each
#             pipeline's row), in LANES (default 2) processes side by side, strategy i in lane i mod
#             LANES, each lane with its share of the CPU threads (three lanes of 16 threads each left
#             the GPU idle half the time, ninth session) and each strategy with its share of the
#             lane's time left; TRAJ_ITERATIONS (default 400) and TRAJ_POINTS (4);
#   search    the 32-trial mean-teacher search of issue 7 at SCALE (default 0.1: 1,000-iteration
#             trials, ASHA's rungs scaled alike), 4 trials per GPU, with its projected full-scale
#             wall time (benchmarks/search_wall.py; after the packed stage in the same call, also at
#             the packed rate; 197 s at SCALE=0.02 on an H200, about 10 minutes at 0.1; not in the
#             default STAGES).
# The fourth device session ran (benchmarks/notes/performance.md, "The fourth session"):
#   STAGES="compile trajectory" METHODS=uamt,mt,ict,em,dv,dan,supervised SET="uncertainty_copies=8 uncertainty_with_target=true" COMPILE=1 RESERVE=80 DEADLINE=565 bash benchmarks/gpu_check.sh
#   STAGES=tests DEADLINE=170 bash benchmarks/gpu_check.sh
# The fifth (on an H100; performance.md, "The fifth session"):
#   STAGES="tests compile packed mps" METHODS=mt COMPILE=1 RESERVE=270 DEADLINE=565 bash benchmarks/gpu_check.sh
#   STAGES=search SCALE=0.02 COMPILE=0 DEADLINE=310 bash benchmarks/gpu_check.sh   # ran out of time
# The ninth (H200; performance.md, "The ninth session"): the reference feed's trajectories ran out of time
#   LANES=3 TRAJ_PIPELINES=reference STAGES="tests trajectories" DEADLINE=555 bash benchmarks/gpu_check.sh
# What is still open (performance.md, "The next device session"), one whole call each:
#   STAGES="tests trajectories" DEADLINE=560 bash benchmarks/gpu_check.sh   # ours against fp32, six strategies
#   STAGES=search SCALE=0.05 COMPILE=1 DEADLINE=585 bash benchmarks/gpu_check.sh   # on an H100, worker reuse
# and a shorter one, UA-MT's grouped forward (the reference's math in one teacher forward) against the reference feed:
#   STAGES="tests compile" METHODS=uamt SET="uncertainty_grouped_forward=true" COMPARE="uncertainty_grouped_forward=false" RESERVE=0 DEADLINE=330 bash benchmarks/gpu_check.sh
# inductor's cache is kept in .inductor-cache/ (git-ignored, kept between calls on the same
# machine), so a later call does not compile the same networks again.
# Results go to $OUT (JSON, logs). On the lent GPU machine, from the repo root:
#   source .gpu-bundle/install.sh && STAGES=... bash benchmarks/gpu_check.sh
# Locally, a CPU dry run of the same stages at a tiny size: DEVICE=cpu SMALL=1 bash benchmarks/gpu_check.sh
set -u -o pipefail
OUT=${OUT:-/tmp/gpu-check}
DEVICE=${DEVICE:-cuda}
STAGES=${STAGES:-tests compile table packed train trajectory}
METHODS=${METHODS:-all}
COMPILE=${COMPILE:-0}
for stage in $STAGES; do
  case " tests compile table variant packed mps train trajectory trajectories search " in
    *" $stage "*) ;;
    *) echo "gpu_check: STAGES: unknown stage '$stage'; expected some of: tests compile table variant packed mps train trajectory trajectories search" >&2; exit 2;;
  esac
done
case "${LANES:-2}" in
  ''|*[!0-9]*|0) echo "gpu_check: LANES: '${LANES}' is invalid; expected a whole number >= 1" >&2; exit 2;;
esac
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}" TORCHINDUCTOR_CACHE_DIR="$PWD/.inductor-cache"
# without an installed package, raysemi.search_spaces must sit inside raysemi/ (pyproject maps it there)
[ -e raysemi/search_spaces ] || ln -s ../search_spaces raysemi/search_spaces
WORK=$(mktemp -d)
if [ "${SMALL:-0}" = 1 ]; then
  PATIENTS=14; SIZE="64 64"; PATCH=64; BS=8; IT=10; REFIT=12; PACKIT=60; PACKEVAL=20; TRAINIT=40; EVAL=20; TRAJ=40
  TRAJ_ITERATIONS=${TRAJ_ITERATIONS:-40}
  SEARCH=(--trials 2 --iterations 200 --grace-period 50 --eval-interval 50 --cpus-per-trial 1)
else
  SEARCH=()
  PATIENTS=100; SIZE="256 216"; PATCH=256; BS=24; IT=100; REFIT=66; PACKIT=600; PACKEVAL=100; TRAINIT=200; EVAL=100; TRAJ=500
fi
COMPILE_FLAG=(); [ "$COMPILE" = 1 ] && COMPILE_FLAG=(--compile)
TRAIN_COMPILE=(); [ "$COMPILE" = 1 ] && TRAIN_COMPILE=(--compile on)
TABLE_SETS=(); for kv in ${SET:-}; do TABLE_SETS+=(--set "$kv"); done
for kv in ${COMPARE:-}; do TABLE_SETS+=(--compare-set "$kv"); done
log() { echo "== $(date +%T) $*"; }
want() { [[ " $STAGES " == *" $1 "* ]]; }
# the whole check must end inside the device call's limit: each stage gets at most what is left
DEADLINE=${DEADLINE:-540}
RESERVE=${RESERVE:-5}  # seconds the table stages (compile, table) leave to the stages after them
left() { local l=$((DEADLINE - SECONDS - ${1:-0})); [ $l -lt 5 ] && l=5; [ $l -gt ${2:-9999} ] && l=$2; echo $l; }
{
log "machine (stages: $STAGES; compile in packed/train: $COMPILE)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
python3 -c "import torch, ray, optuna, mlflow; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'ray', ray.__version__, 'optuna', optuna.__version__, 'mlflow', mlflow.__version__)"
log "phantom ($PATIENTS patients, $SIZE)"
python3 -m raysemi.data phantom --out "$WORK/data" --patients $PATIENTS --size $SIZE --workers 16 || exit 1
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -lms 500 > "$OUT/gpu_util.csv" 2>/dev/null &
SMI=$!

if want tests; then
  log "CUDA tests"
  timeout $(left 0 100) python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py -rfs 2>&1 | tail -25
  echo "tests exit: $?"
fi

if want variant; then
  VARIANT=${VARIANT:-uncertainty_copies=8}
  log "throughput of ${VARIANT_METHODS:-uamt} with $VARIANT (graphs on${COMPILE_FLAG:+, compile on})"
  SETS=(); for kv in $VARIANT; do SETS+=(--set "$kv"); done
  timeout $(left $RESERVE 120) python3 benchmarks/throughput.py --device $DEVICE --data "$WORK/data" --size $PATCH --batch-size $BS \
    --methods ${VARIANT_METHODS:-uamt} --warmup 20 --iterations $IT --repeats 2 "${SETS[@]}" "${COMPILE_FLAG[@]}" \
    --out "$OUT/throughput_${DEVICE}_variant${COMPILE_FLAG:+_compile}.json"
  echo "variant exit: $?"
fi

if want compile; then
  log "throughput: graphs, graphs + compile, reference pipeline ($METHODS${SET:+; $SET}${COMPARE:+; B: $COMPARE})"
  timeout $(left $RESERVE) python3 benchmarks/throughput.py --device $DEVICE --data "$WORK/data" --size $PATCH --batch-size $BS \
    --methods $METHODS --warmup 20 --iterations $IT --repeats 2 --compare-compile --compare-reference-pipeline \
    --reference-iterations $REFIT "${TABLE_SETS[@]}" --out "$OUT/throughput_${DEVICE}_compile${SET:+_set}.json"
  echo "compile table exit: $?"
fi

if want table; then
  log "throughput: graphs, eager, reference pipeline ($METHODS${SET:+; $SET}${COMPARE:+; B: $COMPARE})"
  timeout $(left $RESERVE) python3 benchmarks/throughput.py --device $DEVICE --data "$WORK/data" --size $PATCH --batch-size $BS \
    --methods $METHODS --warmup 20 --iterations $IT --repeats 2 --compare-eager --compare-reference-pipeline \
    --reference-iterations $REFIT "${TABLE_SETS[@]}" --out "$OUT/throughput_${DEVICE}${SET:+_set}.json"
  echo "table exit: $?"
fi

# four packed mean-teacher trials through the search; $1: the JSON name's suffix after packed4
packed4() {
  timeout $(left 60 240) python3 benchmarks/throughput.py --device $DEVICE --data "$WORK/data" --size $PATCH \
    --batch-size $BS --methods mean_teacher --packed 4 --packed-iterations $PACKIT --packed-eval-interval $PACKEVAL \
    "${COMPILE_FLAG[@]}" --out "$OUT/throughput_${DEVICE}_packed4$1${COMPILE_FLAG:+_compile}.json"
}

if want packed; then
  log "four packed mean-teacher trials through the search (graphs on${COMPILE_FLAG:+, compile on})"
  packed4 ""
  echo "packed exit: $?"
fi

if want mps; then
  log "four packed mean-teacher trials under MPS (graphs on${COMPILE_FLAG:+, compile on})"
  if ! command -v nvidia-cuda-mps-control >/dev/null; then
    echo "mps: nvidia-cuda-mps-control is not on this machine; stage skipped"
  else
    export CUDA_MPS_PIPE_DIRECTORY=$WORK/mps-pipe CUDA_MPS_LOG_DIRECTORY=$WORK/mps-log  # Ray's workers inherit them
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    mps_quit() { echo quit | nvidia-cuda-mps-control >/dev/null 2>&1; }
    if nvidia-cuda-mps-control -d; then
      trap mps_quit EXIT; trap 'mps_quit; exit 143' INT TERM  # the daemon outlives this script otherwise
      echo "mps: daemon started"
      packed4 _mps
      echo "mps exit: $?"
      # CUDA falls back to no MPS when a client cannot connect: the control log counts who did
      echo "mps: $(grep -io 'new client [0-9]*' "$CUDA_MPS_LOG_DIRECTORY/control.log" 2>/dev/null | sort -u | wc -l) client processes in control.log"
      mps_quit; trap - EXIT INT TERM
      cp "$CUDA_MPS_LOG_DIRECTORY/control.log" "$OUT/mps_control.log" 2>/dev/null
    else
      echo "mps: the MPS daemon did not start; stage skipped"
    fi
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  fi
fi

if want train; then
  log "train on $DEVICE, then resume (${TRAIN_COMPILE[*]:-compile off})"
  timeout $(left 5 240) bash -c "python3 -m raysemi.train --method interpolation_consistency --data '$WORK/data' \
    --device $DEVICE ${TRAIN_COMPILE[*]} --patch-size $PATCH $PATCH --batch-size $BS --labeled-bs $((BS / 2)) \
    --max-iterations $((TRAINIT / 2)) --eval-interval $EVAL --output '$WORK/run' --tracking-uri 'sqlite:///$WORK/mlflow.db' \
    && python3 -m raysemi.train --method interpolation_consistency --data '$WORK/data' --device $DEVICE ${TRAIN_COMPILE[*]} \
    --patch-size $PATCH $PATCH --batch-size $BS --labeled-bs $((BS / 2)) --max-iterations $TRAINIT \
    --eval-interval $EVAL --output '$WORK/run' --resume '$WORK/run/last.pt' --tracking-uri 'sqlite:///$WORK/mlflow.db'" 2>&1 | tail -15
  echo "train exit: $?"; cp "$WORK/run/results.json" "$OUT/train_results.json" 2>/dev/null
fi

if want trajectory; then
  log "mean teacher's Dice trajectory, graphs on"
  timeout $(left 5 80) python3 benchmarks/trajectory.py --device $DEVICE --data "$WORK/data" --size $PATCH --batch-size $BS \
    --methods mt --iterations $TRAJ --points 5 --seeds 3 --pipelines ours "${COMPILE_FLAG[@]}" \
    --out "$OUT/trajectory_${DEVICE}_graphs${COMPILE_FLAG:+_compile}.json"
  echo "trajectory exit: $?"
fi
if want trajectories; then
  IFS=, read -ra TMS <<< "${TRAJ_METHODS:-dv,dan,uamt,supervised,em,ict}"
  LANES=${LANES:-2}; TN=${TRAJ_ITERATIONS:-400}; TP=${TRAJ_POINTS:-4}; TPL=${TRAJ_PIPELINES:-fp32}
  CORES=$(nproc); THREADS=$((CORES / LANES > 0 ? CORES / LANES : 1))
  log "Dice trajectories, ours (graphs on${COMPILE_FLAG:+, compile on}) against $TPL: ${TMS[*]} ($TN iterations, $LANES lanes of $THREADS threads)"
  PIDS=()
  for ((lane = 0; lane < LANES; lane++)); do
    (for ((i = lane; i < ${#TMS[@]}; i += LANES)); do
      m=${TMS[$i]}
      # this strategy's share of the lane's time left, so that one slow strategy does not take it all
      SHARE=$(( (DEADLINE - SECONDS - 5) / ((${#TMS[@]} - 1 - i) / LANES + 1) ))
      if [ $SHARE -lt 30 ]; then echo "[$m] skipped: $SHARE s would be its share of the time left"; continue; fi
      OMP_NUM_THREADS=$THREADS timeout $(left 5 $SHARE) python3 benchmarks/trajectory.py --device $DEVICE --data "$WORK/data" \
        --size $PATCH --batch-size $BS --methods "$m" --iterations $TN --points $TP --seeds 3 --pipelines "ours,$TPL" "${COMPILE_FLAG[@]}" \
        --out "$OUT/trajectory_${DEVICE}_$m${COMPILE_FLAG:+_compile}.json" 2>&1 | sed -u "s/^/[$m] /"
      echo "[$m] trajectory exit: ${PIPESTATUS[0]}"
    done) &
    PIDS+=($!)
  done
  wait "${PIDS[@]}"  # not a bare wait: the nvidia-smi logger runs in the background too
fi
if want search; then
  log "the 32-trial search at scale ${SCALE:-0.1}"
  # the packed stage's summed rate, when it ran in this call, gives the GPU-bound projection
  RATE=(); PACKED_JSON="$OUT/throughput_${DEVICE}_packed4${COMPILE_FLAG:+_compile}.json"
  R=$([ -f "$PACKED_JSON" ] && python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['packed']['total_steady_it_per_s'])" "$PACKED_JSON" 2>/dev/null)
  [ -n "$R" ] && RATE=(--packed-rate "$R")
  # search_wall stops the search itself 45 s before the stage's end (20 s for its trials to end, then
  # it kills the rest), so what the trials reported comes back; on timeout's SIGTERM it does the same
  LIMIT=$(left 5); timeout $LIMIT python3 benchmarks/search_wall.py --device $DEVICE --data "$WORK/data" --size $PATCH \
    --batch-size $BS --scale ${SCALE:-0.1} "${SEARCH[@]}" "${COMPILE_FLAG[@]}" "${RATE[@]}" \
    --time-limit $((LIMIT > 90 ? LIMIT - 45 : LIMIT / 2)) --stop-grace 20 --out "$OUT/search_wall_${DEVICE}.json"
  echo "search exit: $?"
fi
kill $SMI 2>/dev/null
rm -rf "$WORK"
log "done"
} 2>&1 | tee "$OUT/log.txt"
