# gemm's AVX-512 kernels: /tmp/xrun-base built from f2dad15, /tmp/xrun-v4 the same with
# gemm = { version = "0.19", features = ["x86-v4"] } added to Cargo.toml (not kept).
set -u
cd /work/main
A="--steps 10 --warmup 2 --batch 32 --seq 128"
R=/tmp/r20
for round in 1 2; do
  for shape in bert-mini bert-small; do
    for b in base v4; do
      /usr/bin/time -f "$b $shape %e s %P %M KB" /tmp/xrun-$b bench --backend cpu --shape $shape $A >> $R/bench-$b.jsonl 2>> $R/bench-time.txt
    done
  done
done
echo done > $R/done
