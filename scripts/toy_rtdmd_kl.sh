#!/usr/bin/env bash
# docs/results.md's `toy-rtdmd-kl` table: RTDMD stage 2 with and without a KL to the stage-1 policy
# (`method.kl_weight`, not in the official code) on the VP toy teacher. Stage 1 is AC-DMD at teacher CFG 1, the
# closest start to the unguided teacher that the tilt p_teacher(x | c) exp(r(x) / beta) is defined on; stage 2
# takes the digits-class reward. Rows: the official stage 2 (no KL, the preset's lr 3e-5), then lr 3e-4 with KL
# weights 0 to 10 (seed 0), and the three weights nearest the aims for a second training seed; at KL 1 (seed 0),
# variants of the policy gradient: all three stochastic steps trained, K = 8 images per prompt, both, no reward
# backprop (also at KL 0.5) and no AC-DMD term on the last step; the teacher's 50-step CFG frontier and its tilted
# rows for reference, and stage 1 tilted (the optimum of stage 2 with a KL to it, beta in units of the reward's std,
# about 1 here). One run at a time (2 cores), about 95 minutes; runs already exported are skipped.
#   bash scripts/toy_rtdmd_kl.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/toy_train_lib.sh   # train NAME OVERRIDES..., $RUNS
M=toy-digits
C1=(model=$M method.real_guidance=1)
stage2() {   # stage2 SEED NAME OVERRIDES...: recipe=rtdmd from that seed's stage-1 export
  local seed=$1 name=$2; shift 2
  train "$name" recipe=rtdmd "${C1[@]}" train.seed="$seed" teacher.pretrained="$RUNS/rtdmd_cold-c1-s$seed/export" "$@"
}
students=()
for seed in 0 1; do
  train rtdmd_cold-c1-s$seed recipe=rtdmd_cold "${C1[@]}" train.seed=$seed
  stage2 $seed rtdmd-c1-s$seed train.lr=3e-5 method.kl_weight=0   # the flow toy preset's stage 2, official (no KL)
  students+=(--student "rtdmd_cold (seed $seed)=$RUNS/rtdmd_cold-c1-s$seed/export"
             --student "rtdmd, no KL, lr 3e-5 (seed $seed)=$RUNS/rtdmd-c1-s$seed/export")
  kls=(1 0.5 0.7); [ $seed = 0 ] && kls=(0 0.3 0.5 0.7 1 3 10)
  for kl in "${kls[@]}"; do
    stage2 $seed rtdmd-c1-kl$kl-s$seed train.lr=3e-4 method.kl_weight=$kl
    students+=(--student "rtdmd, KL $kl, lr 3e-4 (seed $seed)=$RUNS/rtdmd-c1-kl$kl-s$seed/export")
  done
done
stage2 0 rtdmd-c1-kl1-500-s0 train.lr=3e-4 method.kl_weight=1 train.steps=500
students+=(--student "rtdmd, KL 1, lr 3e-4, 500 steps (seed 0)=$RUNS/rtdmd-c1-kl1-500-s0/export")
variant() {  # variant NAME LABEL OVERRIDES...: seed 0, lr 3e-4, KL 1 unless the overrides say otherwise
  local name=$1 label=$2; shift 2
  stage2 0 "$name" train.lr=3e-4 method.kl_weight=1 "$@"
  students+=(--student "rtdmd, $label (seed 0)=$RUNS/$name/export")
}
variant rtdmd-c1-kl1-ts3-s0 "KL 1, 3 trained steps" method.train_steps=3
variant rtdmd-c1-kl1-k8-s0 "KL 1, K = 8" method.group_size=8
variant rtdmd-c1-kl1-ts3-k8-s0 "KL 1, 3 trained steps, K = 8" method.train_steps=3 method.group_size=8
variant rtdmd-c1-kl1-bp0-s0 "KL 1, no reward backprop" method.bp_weight=0
variant rtdmd-c1-kl0.5-bp0-s0 "KL 0.5, no reward backprop" method.kl_weight=0.5 method.bp_weight=0
variant rtdmd-c1-kl1-aux0-s0 "KL 1, no AC-DMD term" method.aux_weight=0
python scripts/toy_benchmark.py --teacher $M "${students[@]}" --teacher-steps 50 --teacher-guidance 1.5,1.25,1 \
  --tilt-beta 1,0.25 --tilt-student "rtdmd_cold (seed 0)=$RUNS/rtdmd_cold-c1-s0/export" \
  --tilt-student "rtdmd_cold (seed 1)=$RUNS/rtdmd_cold-c1-s1/export" --rewards digits-class,micro-clip \
  --section toy-rtdmd-kl -n 1000
