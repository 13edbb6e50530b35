#!/usr/bin/env bash
# docs/results.md's RTDMD tables (issue 14's benchmark): `toy-rtdmd` on the flow toy teacher (the default,
# toy-digits-sd3) and `toy-rtdmd-vp` on the VP toy teacher (toy-digits, CPS in its VP form). One run at a time
# (2 cores): for training seeds 0 and 1, RTDMD stage 1 (AC-DMD, recipe=rtdmd_cold), stage 2 from its export
# (recipe=rtdmd, the digits-class reward), the plain DMD2 student and DMD2 with reward backprop at stage 2's
# reward-backprop weight; then every student and the teacher scored with FID on both digits feature spaces, class
# accuracy, diversity, the digits-class reward that RTDMD trains on and micro-CLIP, a scorer no run trains on
# (reward hacking shows as a gain in the first without the second). The teacher is scored at four CFG scales, its
# own accuracy-diversity frontier, which a reward-tilted student should beat, and the teacher at CFG 1 tilted by the
# digits-class reward (exact draws by rejection sampling), the target a tilted student approaches. About 75 minutes
# per teacher on 2 cores; runs already exported are skipped, so an interrupted call resumes where it stopped.
#   bash scripts/toy_rtdmd.sh                # flow toy teacher
#   bash scripts/toy_rtdmd.sh toy-digits     # VP toy teacher
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/toy_train_lib.sh   # train NAME OVERRIDES..., $RUNS
M=${1:-toy-digits-sd3}
case $M in
  toy-digits-sd3) P=sd3-; SECTION=toy-rtdmd ;;
  toy-digits) P=; SECTION=toy-rtdmd-vp ;;   # run names shared with scripts/toy_students.sh (same commands)
  *) echo "toy_rtdmd.sh: unknown teacher '$M'; use toy-digits-sd3 or toy-digits" >&2; exit 2 ;;
esac

REWARD=("method.reward=[{name: digits-class}]" method.reward_weight=0.01)   # rtdmd's toy bp_weight
for seed in 0 1; do
  train ${P}rtdmd_cold-s$seed recipe=rtdmd_cold model=$M train.seed=$seed
  train ${P}rtdmd-s$seed recipe=rtdmd model=$M train.seed=$seed teacher.pretrained="$RUNS/${P}rtdmd_cold-s$seed/export"
  train ${P}dmd2-s$seed recipe=dmd2 model=$M train.seed=$seed
  train ${P}dmd2-reward-s$seed recipe=dmd2 model=$M train.seed=$seed "${REWARD[@]}"
done

students=()
for seed in 0 1; do
  for name in ${P}dmd2-s$seed ${P}dmd2-reward-s$seed ${P}rtdmd_cold-s$seed ${P}rtdmd-s$seed; do
    students+=(--student "${name%-s$seed} (seed $seed)=$RUNS/$name/export")
  done
done
python scripts/toy_benchmark.py --teacher $M "${students[@]}" --teacher-steps 50,4 --teacher-guidance 1.5,1.25,1.1,1 \
  --tilt-beta 1,0.5,0.25 --rewards digits-class,micro-clip --section $SECTION -n 1000
