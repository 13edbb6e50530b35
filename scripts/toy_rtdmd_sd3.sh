#!/usr/bin/env bash
# docs/results.md's `toy-rtdmd` table (issue 14's benchmark) on the flow toy teacher (toy-digits-sd3), one run at a
# time (2 cores): for training seeds 0 and 1, RTDMD stage 1 (AC-DMD, recipe=rtdmd_cold), stage 2 from its export
# (recipe=rtdmd, 250 steps, the digits-class reward), the plain DMD2 student and DMD2 with reward backprop at stage 2's
# reward-backprop weight; then every student and the teacher scored with FID on both digits feature spaces,
# class accuracy, diversity, the digits-class reward that RTDMD trains on and micro-CLIP, a scorer no run trains
# on (reward hacking shows as a gain in the first without the second). About 70 minutes on 2 CPU cores; runs
# already exported are skipped, so an interrupted call resumes where it stopped.
#   bash scripts/toy_rtdmd_sd3.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/toy_train_lib.sh   # train NAME OVERRIDES..., $RUNS
M=toy-digits-sd3

REWARD=("method.reward=[{name: digits-class}]" method.reward_weight=0.01)   # rtdmd's toy bp_weight
for seed in 0 1; do
  train sd3-rtdmd_cold-s$seed recipe=rtdmd_cold model=$M train.seed=$seed
  train sd3-rtdmd-s$seed recipe=rtdmd model=$M train.seed=$seed teacher.pretrained="$RUNS/sd3-rtdmd_cold-s$seed/export"
  train sd3-dmd2-s$seed recipe=dmd2 model=$M train.seed=$seed
  train sd3-dmd2-reward-s$seed recipe=dmd2 model=$M train.seed=$seed "${REWARD[@]}"
done

students=()
for seed in 0 1; do
  for name in sd3-dmd2-s$seed sd3-dmd2-reward-s$seed sd3-rtdmd_cold-s$seed sd3-rtdmd-s$seed; do
    students+=(--student "${name%-s$seed} (seed $seed)=$RUNS/$name/export")
  done
done
python scripts/toy_benchmark.py --teacher $M "${students[@]}" --teacher-steps 50,4 --teacher-guidance 1.5,1 \
  --rewards digits-class,micro-clip --section toy-rtdmd -n 1000
