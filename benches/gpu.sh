#!/usr/bin/env bash
# The GPU side of BENCHMARKS.md, as one script for a machine with an NVIDIA GPU and no Rust
# toolchain: build and strip the binary elsewhere (`cargo build --release && strip
# target/release/xrun`), carry it with the repository, then run `bash benches/gpu.sh`.
# Each command has a timeout, since a cold autotune can take minutes. Output: JSON lines in
# $OUT/bench.jsonl (default bench-out/), one per shape × implementation, and the logs.
#
#   XRUN=path/to/xrun OUT=dir SHAPES="bert-mini bert-base" STEPS=50 bash benches/gpu.sh
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
XRUN=${XRUN:-target/release/xrun}
OUT=${OUT:-bench-out}
SHAPES=${SHAPES:-bert-mini bert-small bert-base gpt-small}
STEPS=${STEPS:-50}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
common=(--steps "$STEPS" --warmup 5 --batch 32 --seq 128 --min-len 16 --vocab 21128)
for shape in $SHAPES; do
  # f32 twice: the first run tunes and compiles (cold caches), the second shows the time to first
  # step with warm caches (autotune results and compiled PTX, both under --cache-dir: goal 3).
  # Then bf16 (its kernels tune separately).
  for pass in cold:f32 warm:f32 cold:bf16; do
    timeout 300 "$XRUN" bench --backend cuda --precision "${pass#*:}" --shape "$shape" "${common[@]}" \
      --cache-dir "$OUT/cache" >> "$OUT/bench.jsonl" 2>> "$OUT/xrun-$shape-${pass/:/-}.log" \
      || echo "{\"shape\": \"$shape\", \"backend\": \"xrun cuda\", \"failed\": \"$pass, exit $?\"}" >> "$OUT/bench.jsonl"
  done
  for precision in f32 bf16; do
    timeout 300 "$PY" benches/pytorch_reference.py --device cuda --precision "$precision" \
      --shape "$shape" "${common[@]}" >> "$OUT/bench.jsonl" 2>> "$OUT/torch-$shape.log" \
      || echo "{\"shape\": \"$shape\", \"backend\": \"pytorch $precision\", \"failed\": \"exit $?\"}" >> "$OUT/bench.jsonl"
  done
done
cat "$OUT/bench.jsonl"
# The end-to-end comparison (goal 2): the headline pipeline, objectives none and mlm, in xrun and in
# PyTorch + transformers (benches/e2e_hf.py), wall time and test accuracy. E2E=0 skips it.
if [ "${E2E:-1}" = 1 ]; then
  /usr/bin/time -f "xrun wall %e s" timeout 600 "$XRUN" experiments/clue_tnews.toml -q --backend cuda \
    --set model.norm=post --set 'sweep.grid={"pretrain.objective"=["none","mlm"]}' \
    --set experiment.output_dir="$OUT/e2e" > "$OUT/e2e-xrun.log" 2>&1
  cp "$OUT/e2e/clue_tnews/tables/tnews_test_accuracy.md" "$OUT/e2e-xrun-table.md" 2>/dev/null
  /usr/bin/time -f "pytorch wall %e s" timeout 600 "$PY" benches/e2e_hf.py --device cuda \
    --data-root "${XRUN_DATA_ROOT:-../shared/data}" > "$OUT/e2e-hf.jsonl" 2> "$OUT/e2e-hf.log"
  tail -n 2 "$OUT/e2e-xrun.log" "$OUT/e2e-hf.log"; tail -n 1 "$OUT/e2e-hf.jsonl"; cat "$OUT/e2e-xrun-table.md"
fi
