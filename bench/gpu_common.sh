# Sourced by the GPU bench scripts. STEP_DIR (set before the first step) is where they log.
#   step NAME COMMAND...  runs COMMAND with its output in $STEP_DIR/NAME.log and appends
#                         "NAME rc=N Ss" to $STEP_DIR/steps.txt (and stdout); a failing step
#                         does not stop the script.
#   "${GPT2_FLAGS[@]}"    `tutti train`'s flags for GPT-2 124M (vocabulary 50304, context 1024) on
#                         synthetic tokens as every GPU run here trains it: no warm-up, evaluation
#                         and checkpoint only at the end, a metrics line a step; the caller adds
#                         batch, steps, dtype and --out.
step() {
  local name=$1; shift
  local t0=$SECONDS
  "$@" > "$STEP_DIR/$name.log" 2>&1
  echo "$name rc=$? $((SECONDS - t0))s" | tee -a "$STEP_DIR/steps.txt"
}
GPT2_FLAGS=(--device cuda --data synthetic --vocab 50304 --layers 12 --heads 12 --dim 768 --context 1024 --warmup 0
  --eval-interval 100000 --eval-batches 1 --checkpoint-interval 100000 --log-interval 1)
