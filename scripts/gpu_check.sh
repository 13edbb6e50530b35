#!/usr/bin/env bash
# GPU checks and benchmarks (CI has no GPU, so these run by hand on a CUDA machine):
#   bash scripts/gpu_check.sh STAGE [STAGE ...]
# Stages:
#   env      GPU, driver and package versions
#   tests    tests/test_cuda.py (CUDA vs CPU, bf16, attention kernels, compile, CUDA graphs, bf16 training)
#   suite    the whole default test suite with the GPU visible (every "cuda when available" default)
#   toy      `fewstep bench` of the toy teacher and toy students on the GPU -> docs/results.md
#   sd15     (= sd15kernels + sd15compile) a shape-only SD1.5 (random weights, real layer shapes): precision, weights dtype, attention kernels,
#            torch.compile and CUDA graphs, engine vs stock Diffusers -> docs/results.md
#   sd15engine  engine vs stock on the shape-only SD1.5, real and stubbed network
#   train    DMD2 and LCM LoRA training cost on the shape-only SD1.5 -> docs/results.md
#   smoke    quick versions of sd15 and train (a few repeats/iterations, nothing written to docs/)
# Logs go to $GPU_LOGS (default gpu-logs/). Shape-only pipelines go to $SHAPES (default /tmp/fewstep-shapes).
set -uo pipefail
cd "$(dirname "$0")/.."
command -v fewstep >/dev/null || fewstep() { python3 -m fewstep "$@"; }
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LOGS=${GPU_LOGS:-gpu-logs}
SHAPES=${SHAPES:-/tmp/fewstep-shapes}
mkdir -p "$LOGS" "$SHAPES"
FAILED=()

run() {  # run NAME COMMAND...: log to $LOGS/NAME.log, remember failures, keep going
    local name=$1; shift
    echo "== $name: $*"
    local t0=$SECONDS
    "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    echo "   rc=$rc, $((SECONDS - t0)) s; last lines:"
    tr '\r' '\n' <"$LOGS/$name.log" | grep -v '^\s*$' | tail -n 4 | cut -c1-240 | sed 's/^/   | /'
    [ $rc -eq 0 ] || FAILED+=("$name")
}

shape() {  # shape FAMILY: build the shape-only pipeline once
    [ -f "$SHAPES/$1/model_index.json" ] || python3 scripts/random_pipeline.py "$1" "$SHAPES/$1" --device cuda
}

stage_env() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    python3 - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())
for m in ("diffusers", "transformers", "accelerate", "peft", "xformers", "triton"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as exc:  # noqa: BLE001
        print(m, "unavailable:", str(exc).splitlines()[0][:120])
EOF
}

stage_tests() { run cuda-tests python3 -m pytest -q -rs tests/test_cuda.py ${PYTEST_K:+-k "$PYTEST_K"}; }

stage_suite() {
    local n; n=$(python3 -c "import os; print(min(8, os.cpu_count() or 1))")
    run suite python3 -m pytest -q --maxfail=25 -n "$n" -p no:cacheprovider --ignore=tests/test_cuda.py
}

stage_toy() {
    local common=(--batch-sizes 1,64 --compare-stock --repeats 10 --no-progress --results docs/results.md)
    run toy-teacher fewstep bench toy-digits --steps 1,4,50 --guidance 2 "${common[@]}" \
        --out docs/bench/gpu-toy-teacher --section gpu-bench-toy-teacher
    run toy-loop fewstep bench toy-digits --steps 4,50 --guidance 2 --stub-network "${common[@]}" \
        --out docs/bench/gpu-toy-loop --section gpu-bench-toy-loop
    if [ -f runs/dmd2-toy/export/fewstep.json ]; then
        run toy-dmd2 fewstep bench runs/dmd2-toy/export --steps 4 "${common[@]}" \
            --out docs/bench/gpu-toy-dmd2 --section gpu-bench-toy-dmd2
    fi
}

sd15_variants() {  # sd15_variants OUT SECTION STEPS BATCHES REPEATS RESULTS
    local out=$1 section=$2 steps=$3 batches=$4 repeats=$5 results=$6
    shape sd15 || return 1
    run "sd15-kernels-$section" python3 scripts/bench_variants.py "$SHAPES/sd15" --steps "$steps" \
        --batch-sizes "$batches" --repeats "$repeats" --guidance 7.5 --out "$out/kernels" \
        --results "$results" --section "$section-kernels" \
        --variant "fp32 weights, TF32=precision=fp32,compare_stock=true" \
        --variant "fp32 weights, bf16 autocast=compare_stock=true" \
        --variant "bf16 weights=dtype=bfloat16,compare_stock=true" \
        --variant "bf16 weights, math attention=dtype=bfloat16,attention=math" \
        --variant "bf16 weights, flash attention=dtype=bfloat16,attention=flash" \
        --variant "bf16 weights, efficient attention=dtype=bfloat16,attention=efficient" \
        --variant "bf16 weights, xformers=dtype=bfloat16,attention=xformers" \
        --variant "bf16 weights, network stubbed=dtype=bfloat16,stub_network=true,compare_stock=true"
}

sd15_compile() {  # sd15_compile OUT SECTION STEPS REPEATS RESULTS
    local out=$1 section=$2 steps=$3 repeats=$4 results=$5
    shape sd15 || return 1
    run "sd15-compile-$section" python3 scripts/bench_variants.py "$SHAPES/sd15" --steps "$steps" \
        --batch-sizes 1 --repeats "$repeats" --guidance 7.5 --out "$out/compile" \
        --results "$results" --section "$section-compile" \
        --variant "bf16 weights, eager=dtype=bfloat16" \
        --variant "bf16 weights, torch.compile=dtype=bfloat16,compile=true" \
        --variant "bf16 weights, CUDA graphs=dtype=bfloat16,cuda_graphs=true"
}

stage_sd15() {
    sd15_variants docs/bench/gpu-sd15 gpu-sd15 4,25 1 5 docs/results.md
    sd15_compile docs/bench/gpu-sd15 gpu-sd15 4,25 5 docs/results.md
}
stage_sd15engine() {  # engine vs stock with the real network and with it stubbed (loop overhead alone)
    shape sd15 || return 1
    run sd15-engine python3 scripts/bench_variants.py "$SHAPES/sd15" --steps 4,25 --batch-sizes 1 --repeats 7 \
        --guidance 7.5 --out docs/bench/gpu-sd15/engine --results docs/results.md --section gpu-sd15-engine \
        --variant "bf16 weights=dtype=bfloat16,compare_stock=true" \
        --variant "bf16 weights, network stubbed=dtype=bfloat16,stub_network=true,compare_stock=true"
}
stage_sd15kernels() { sd15_variants docs/bench/gpu-sd15 gpu-sd15 4,25 1 5 docs/results.md; }
stage_sd15compile() { sd15_compile docs/bench/gpu-sd15 gpu-sd15 4,25 5 docs/results.md; }

train_run() {  # train_run NAME RECIPE STEPS EXTRA...
    local name=$1 recipe=$2 steps=$3; shift 3
    shape sd15 || return 1
    [ -f "$SHAPES/images/metadata.jsonl" ] || python3 scripts/gpu_check_images.py "$SHAPES/images" || return 1
    rm -rf "runs/gpu/$name"
    run "train-$name" python3 scripts/distill.py "recipe=$recipe" model=sd15 "teacher.pretrained=$SHAPES/sd15" \
        "data.path=$SHAPES/images" "train.steps=$steps" "output_dir=runs/gpu/$name" \
        train.log_every=5 train.progress=false train.sample_every=0 train.checkpoint_every=0 "$@"
}

stage_train() {
    train_run dmd2-sd15-shape dmd2 40
    train_run lcm-sd15-shape lcm 40
    run train-cost python3 scripts/train_cost.py runs/gpu/dmd2-sd15-shape runs/gpu/lcm-sd15-shape \
        --results docs/results.md --section gpu-train \
        --note "On $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1), shape-only SD1.5 (random weights): cost, not quality."
}

stage_smoke() {
    sd15_variants "$LOGS/smoke-sd15" smoke 4 1 2 "$LOGS/smoke-results.md"
    train_run smoke-dmd2 dmd2 6 train.log_every=2
}

for stage in "$@"; do
    if declare -F "stage_$stage" >/dev/null; then
        echo "#### $stage ($(date -u +%H:%M:%S))"
        "stage_$stage"
    else
        echo "unknown stage $stage; see the header of $0" >&2
        exit 2
    fi
done
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "FAILED: ${FAILED[*]} (logs in $LOGS/)"
    exit 1
fi
echo "all stages passed (logs in $LOGS/)"
