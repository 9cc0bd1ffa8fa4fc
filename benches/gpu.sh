#!/usr/bin/env bash
# The GPU side of BENCHMARKS.md, as one script for a machine with an NVIDIA GPU and no Rust
# toolchain: build and strip the binary elsewhere (`cargo build --release && strip
# target/release/xrun`), carry it with the repository, then run `bash benches/gpu.sh`.
#
# It fits a time budget (BUDGET seconds, default 540: one 10-minute device call with room to copy
# the output back). Work runs in order of importance, each command capped by a timeout and by what
# is left of the budget, and whatever did not fit is listed as skipped in the output:
#   1. per shape (bert-base first, the issue's goal shape): xrun f32 with a cold cache (autotune and
#      kernel compilation), xrun f32 again with the caches warm (time to first step: goal 3),
#      PyTorch eager f32 and bf16 autocast on xrun's batch lengths (goal 1), xrun bf16-mixed
#      (autocast's split: bf16 products, f32 weights; cold, as its kernels tune apart), then xrun
#      pure bf16;
#   2. with E2E=1, instead of the benchmarks: the end-to-end comparison (goal 2), the headline
#      pipeline in PyTorch + transformers, then in xrun from empty caches, then in xrun again on
#      the GPU caches the first xrun run left (run it as its own call);
#   3. with PROFILE=1, instead of the benchmarks: per shape, xrun f32 (5 steps, on the caches of
#      an earlier call with the same OUT, else tuning first) under CubeCL's profiling logger, and
#      where the kernels' time goes (benches/profile_summary.py) in $OUT/profile-<shape>.jsonl.
# Output: JSON lines in $OUT/bench.jsonl (default bench-out/), one per shape x implementation, the
# logs beside them, and nvidia-smi's view of the GPU in gpu.txt.
#
#   XRUN=path/to/xrun OUT=dir SHAPES="bert-base bert-mini" STEPS=30 BUDGET=540 bash benches/gpu.sh
#   E2E=1 BUDGET=1200 bash benches/gpu.sh
#   E2E=1 OBJECTIVES=none BUDGET=300 bash benches/gpu.sh     # the none row alone
#   E2E=1 JOBS=4 BUDGET=600 bash benches/gpu.sh             # xrun runs 4 trials at once (--jobs)
#   PROFILE=1 SHAPES=bert-base BUDGET=300 bash benches/gpu.sh  # where xrun's step time goes
# BACKEND (default cuda) and SIZES (the size options of every bench run) exist to try the script
# on wgpu or the CPU without a GPU; PyTorch runs on the CPU then.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
XRUN=${XRUN:-target/release/xrun}
OUT=${OUT:-bench-out}
SHAPES=${SHAPES:-bert-base bert-mini gpt-small bert-small}
STEPS=${STEPS:-30}
PY=${PYTHON:-python3}
DEADLINE=$((SECONDS + ${BUDGET:-540}))
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BACKEND=${BACKEND:-cuda}
device=cuda; [ "$BACKEND" = cuda ] || device=cpu
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1

# Runs "$@" with a timeout of at most $1 seconds and what is left of the budget; records a JSON
# line saying what was skipped or failed. Usage: capped SECONDS LABEL LOG command...
capped() {
  local cap=$1 label=$2 log=$3; shift 3
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "{\"skipped\": \"$label\", \"reason\": \"budget spent\"}" >> "$OUT/bench.jsonl"
    return
  fi
  [ "$left" -lt "$cap" ] && cap=$left
  echo "{\"run\": \"$label\"}" >> "$OUT/bench.jsonl"
  timeout "$cap" "$@" >> "$OUT/bench.jsonl" 2>> "$OUT/$log" \
    || echo "{\"failed\": \"$label\", \"exit\": $?, \"timeout_s\": $cap}" >> "$OUT/bench.jsonl"
}

if [ "${E2E:-0}" = 1 ]; then
  # The headline pipeline, objectives none and mlm, in PyTorch + transformers (benches/e2e_hf.py)
  # and in xrun: wall time and test accuracy. PyTorch first (seconds on a GPU: the reference is
  # never what the budget cuts), then xrun from empty caches (e2e-cold), then xrun again in a new
  # output directory holding only the cold run's GPU caches, autotune results and kernels
  # (e2e-warm: a later study on the same machine). WARM_S (default 120) is kept for the warm run.
  # xrun logs a line at the first step and every tenth of each stage, and its journal (stage
  # starts and ends, with times) is copied beside the log, so a run cut by its cap still says
  # how far it got.
  objectives=${OBJECTIVES:-none,mlm}
  grid=\"${objectives//,/\",\"}\"
  left=$((DEADLINE - SECONDS)); [ "$left" -gt 300 ] && left=300
  /usr/bin/time -f "pytorch wall %e s" timeout "$left" "$PY" benches/e2e_hf.py --objectives "$objectives" \
    --device "$device" --data-root "${XRUN_DATA_ROOT:-../shared/data}" > "$OUT/e2e-hf.jsonl" 2> "$OUT/e2e-hf.log"
  e2e_xrun() { # NAME CAP
    [ "$2" -ge 20 ] || { echo "xrun $1 skipped: budget spent" >> "$OUT/$1.log"; return; }
    /usr/bin/time -f "xrun $1 wall %e s" timeout "$2" "$XRUN" experiments/clue_tnews.toml \
      --jobs "${JOBS:-1}" --backend "$BACKEND" --set model.norm=post \
      --set "sweep.grid={\"pretrain.objective\"=[$grid]}" --set experiment.output_dir="$OUT/$1" \
      > "$OUT/$1.log" 2>&1
    cp "$OUT/$1/clue_tnews/journal.jsonl" "$OUT/$1-journal.jsonl" 2>/dev/null
    cp "$OUT/$1/clue_tnews/tables/tnews_test_accuracy.md" "$OUT/$1-table.md" 2>/dev/null
  }
  e2e_xrun e2e-cold $((DEADLINE - SECONDS - ${WARM_S:-120}))
  # Warm only on the caches a cold run left: without them it would be a second cold run.
  if [ -d "$OUT/e2e-cold/.cache" ]; then
    mkdir -p "$OUT/e2e-warm/.cache"
    cp -r "$OUT/e2e-cold/.cache/autotune" "$OUT/e2e-cold/.cache/kernels" "$OUT/e2e-warm/.cache/" 2>/dev/null
    du -sh "$OUT/e2e-warm/.cache/"* 2>/dev/null
    e2e_xrun e2e-warm $((DEADLINE - SECONDS))
  fi
  tail -n 3 "$OUT/e2e-hf.log" "$OUT"/e2e-cold.log "$OUT"/e2e-warm.log 2>/dev/null; tail -n 1 "$OUT/e2e-hf.jsonl"
  cat "$OUT"/e2e-*-table.md 2>/dev/null
  exit 0
fi

read -r -a sizes <<< "${SIZES:---batch 32 --seq 128 --min-len 16 --vocab 21128}"
common=(--steps "$STEPS" --warmup 5 "${sizes[@]}")
if [ "${PROFILE:-0}" = 1 ]; then
  # CubeCL reads cubecl.toml from the working directory: run from a folder holding one.
  case $XRUN in /*) ;; *) XRUN=$(pwd)/$XRUN ;; esac
  prof=$(mktemp -d)
  for shape in $SHAPES; do
    log="$prof/$shape.log"
    printf '[profiling.logger]\nlevel = "basic"\nfile = "%s"\n' "$log" > "$prof/cubecl.toml"
    (cd "$prof" && capped 300 "xrun $shape f32 (profiled)" "xrun-$shape-profile.log" \
      "$XRUN" bench --backend "$BACKEND" --shape "$shape" --steps 5 --warmup 2 "${sizes[@]}" \
      --cache-dir "$OUT/cache")
    "$PY" benches/profile_summary.py "$log" > "$OUT/profile-$shape.jsonl" 2>> "$OUT/profile.err"
    head -n 12 "$OUT/profile-$shape.jsonl" | cut -c1-240
  done
  exit 0
fi
xrun_bench() { # SHAPE PASS PRECISION
  capped 240 "xrun $1 $3 ($2 caches)" "xrun-$1-$2-$3.log" \
    "$XRUN" bench --backend "$BACKEND" --precision "$3" --shape "$1" "${common[@]}" --cache-dir "$OUT/cache"
}
torch_bench() { # SHAPE PRECISION
  # The same batches as xrun's last run of the shape (its `batch_lengths`), where one ran: the
  # two then train the same lengths, so effective tokens/s compare speed, not padding.
  local replay=() label="pytorch $1 $2"
  if grep -q "\"shape\":\"$1\".*\"batch_lengths\"" "$OUT/bench.jsonl" 2>/dev/null; then
    replay=(--lengths-from "$OUT/bench.jsonl")
    label="$label (on the lengths of xrun's last run)"
  fi
  capped 120 "$label" "torch-$1.log" \
    "$PY" benches/pytorch_reference.py --device "$device" --precision "$2" --shape "$1" "${common[@]}" "${replay[@]}"
}
for shape in $SHAPES; do
  xrun_bench "$shape" cold f32
  xrun_bench "$shape" warm f32
  torch_bench "$shape" f32
  torch_bench "$shape" bf16
  xrun_bench "$shape" cold bf16-mixed
  xrun_bench "$shape" cold bf16
done
cat "$OUT/bench.jsonl"
