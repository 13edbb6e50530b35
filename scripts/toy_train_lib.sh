# Sourced by the toy run scripts (scripts/toy_students.sh, toy_students_sd3.sh, toy_rtdmd.sh) from the
# repository root. train NAME OVERRIDES...: one `fewstep distill` into $RUNS/NAME (default runs/), skipped when
# that run already has its export, so an interrupted script resumes where it stopped; prints the wall time.
# PAUSE_FILE=/tmp/hold: while that file exists, wait before starting the next run (to measure something alone).
RUNS=${RUNS:-runs}
train() {
  local name=$1; shift
  [ -f "$RUNS/$name/export/fewstep.json" ] && return
  while [ -n "${PAUSE_FILE:-}" ] && [ -e "$PAUSE_FILE" ]; do sleep 5; done
  echo "== $name"
  local start=$SECONDS
  fewstep distill output_dir="$RUNS/$name" train.progress=false "$@"
  echo "== $name: $((SECONDS - start)) s wall"
}
