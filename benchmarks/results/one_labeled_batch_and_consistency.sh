#!/usr/bin/env bash
# supervised at batch 8 and 4 (all labeled), mean teacher with and without its consistency term; one labeled patient
OUT=${OUT:-one_labeled_runs}  # run folders (results.json each); the numbers: their "val" metrics
mkdir -p "$OUT" && cd "$OUT"
common="--labeled-patients 1 --patch-size 64 64 --max-iterations 300 --eval-interval 100 --rampup-interval 2 --mt-warmup 10 --device cpu --no-mlflow"
for s in $(seq ${FIRST:-0} ${LAST:-9}); do
  python -m raysemi.train --method supervised --seed $s --batch-size 8 --labeled-bs 4 $common --output sup8_$s > /dev/null 2>&1
  python -m raysemi.train --method supervised --seed $s --batch-size 4 --labeled-bs 4 $common --output sup4_$s > /dev/null 2>&1
  python -m raysemi.train --method mean_teacher --consistency 0 --seed $s --batch-size 8 --labeled-bs 4 $common --output mt0_$s > /dev/null 2>&1
  python -m raysemi.train --method mean_teacher --consistency 0.1 --seed $s --batch-size 8 --labeled-bs 4 $common --output mt01_$s > /dev/null 2>&1
  echo "seed $s done $(date +%T)"
done
