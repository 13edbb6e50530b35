#!/usr/bin/env bash
# Train every toy student of docs/results.md's `toy-students` table (two training seeds where the table shows a
# spread), one run at a time (2 cores: concurrent runs oversubscribe the threads), then score them all with
# scripts/toy_benchmark.py. Runs already exported are skipped, so an interrupted call resumes where it stopped.
#   bash scripts/toy_students.sh            # about 1.5 h on 2 CPU cores
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/toy_train_lib.sh   # train NAME OVERRIDES..., $RUNS

train tdm-s0 recipe=tdm model=toy-digits train.seed=0
train tdm-s1 recipe=tdm model=toy-digits train.seed=1
# LoRA students and critics: recipes/<recipe>/toy-digits.lora.yaml (tests/test_config.py checks that these layers
# equal the explicit overrides the toy-students table was first measured with)
train dmd2-lora-s0 recipe=dmd2 model=toy-digits train.seed=0 student.mode=lora
train tdm-lora-s0 recipe=tdm model=toy-digits train.seed=0 student.mode=lora
train dmd2_1step-s0 recipe=dmd2_1step model=toy-digits train.seed=0
train phased_dmd-s0 recipe=phased_dmd model=toy-digits train.seed=0
for seed in 0 1; do
  train dmd2-s$seed recipe=dmd2 model=toy-digits train.seed=$seed
  train lcm-lora-s$seed recipe=lcm model=toy-digits train.seed=$seed          # the README's main command
done

students=()
for name in lcm-lora-s0 lcm-lora-s1 dmd2-s0 dmd2-s1 dmd2-lora-s0 tdm-s0 tdm-s1 tdm-lora-s0 dmd2_1step-s0 \
            phased_dmd-s0; do
  students+=(--student "$name=$RUNS/$name/export")
done
python scripts/toy_benchmark.py "${students[@]}" --teacher-steps 50,4,1 --teacher-guidance 2,1 \
  --section toy-students -n 1000
