#!/usr/bin/env bash
# Train every student of docs/results.md's `toy-sd3` table on the flow toy teacher (toy-digits-sd3), one run at a
# time (2 cores: concurrent runs oversubscribe the threads), then score them all with scripts/toy_benchmark.py.
# Two training seeds for DMD2 and TDM (the table's spread); runs already exported are skipped, so an interrupted call
# resumes where it stopped. About 100 minutes on 2 CPU cores.
#   bash scripts/toy_students_sd3.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/toy_train_lib.sh   # train NAME OVERRIDES..., $RUNS
M=toy-digits-sd3

for seed in 0 1; do
  train sd3-dmd2-s$seed recipe=dmd2 model=$M train.seed=$seed
  train sd3-tdm-s$seed recipe=tdm model=$M train.seed=$seed
done
train sd3-lcm-lora-s0 recipe=lcm model=$M train.seed=0          # LCM-LoRA, the main command's recipe
train sd3-dmd2_1step-s0 recipe=dmd2_1step model=$M train.seed=0
train sd3-phased_dmd-s0 recipe=phased_dmd model=$M train.seed=0
# LoRA layers: recipes/<recipe>/toy-digits-sd3.lora.yaml; full LCM: recipes/lcm/toy-digits-sd3.full.yaml
train sd3-dmd2-lora-s0 recipe=dmd2 model=$M train.seed=0 student.mode=lora
train sd3-tdm-lora-s0 recipe=tdm model=$M train.seed=0 student.mode=lora
train sd3-lcm-full-s0 recipe=lcm model=$M train.seed=0 student.mode=full
# DMD regresses on teacher pairs (50 guided Euler steps), made once
[ -d "$RUNS/pairs-toy-sd3" ] || fewstep pairs $M --out "$RUNS/pairs-toy-sd3" --num 2000 --steps 50 --guidance 2
train sd3-dmd-s0 recipe=dmd model=$M train.seed=0 method.pairs_path="$RUNS/pairs-toy-sd3"
# Diagnostic rows (300 steps): LCM-LoRA at the VP toy preset's lr 2e-3, with the preset's layers and with attention
# only, against the preset's 5e-4 (the notes under the table)
train sd3-lcm-lora-lr2e-3-300steps-s0 recipe=lcm model=$M train.seed=0 train.lr=2e-3 train.steps=300
train sd3-lcm-lora-lr2e-3-attn-300steps-s0 recipe=lcm model=$M train.seed=0 train.lr=2e-3 train.steps=300 \
  "student.lora.targets=[]"
# Diagnostic row: TDM with the teacher's CFG at 3, the VP toy preset's, instead of the flow preset's 1.5
train sd3-tdm-cfg3-s0 recipe=tdm model=$M train.seed=0 method.real_guidance=3

students=()
for name in sd3-lcm-lora-s0 sd3-lcm-full-s0 sd3-dmd2-s0 sd3-dmd2-s1 sd3-dmd2-lora-s0 sd3-tdm-s0 sd3-tdm-s1 \
            sd3-tdm-lora-s0 sd3-tdm-cfg3-s0 sd3-dmd2_1step-s0 sd3-phased_dmd-s0 sd3-dmd-s0 \
            sd3-lcm-lora-lr2e-3-300steps-s0 sd3-lcm-lora-lr2e-3-attn-300steps-s0; do
  students+=(--student "$name=$RUNS/$name/export")
done
python scripts/toy_benchmark.py --teacher $M "${students[@]}" --teacher-steps 50,4,1 --teacher-guidance 2,1.5,1 \
  --section toy-sd3 -n 1000
