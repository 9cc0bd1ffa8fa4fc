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
  # Twice: the first run tunes (cold autotune cache), the second shows a warm cache's time to
  # first step.
  for pass in cold warm; do
    timeout 300 "$XRUN" bench --backend cuda --shape "$shape" "${common[@]}" \
      --cache-dir "$OUT/cache" >> "$OUT/bench.jsonl" 2>> "$OUT/xrun-$shape-$pass.log" \
      || echo "{\"shape\": \"$shape\", \"backend\": \"xrun cuda\", \"failed\": \"$pass, exit $?\"}" >> "$OUT/bench.jsonl"
  done
  for precision in f32 bf16; do
    timeout 300 "$PY" benches/pytorch_reference.py --device cuda --precision "$precision" \
      --shape "$shape" "${common[@]}" >> "$OUT/bench.jsonl" 2>> "$OUT/torch-$shape.log" \
      || echo "{\"shape\": \"$shape\", \"backend\": \"pytorch $precision\", \"failed\": \"exit $?\"}" >> "$OUT/bench.jsonl"
  done
done
cat "$OUT/bench.jsonl"
