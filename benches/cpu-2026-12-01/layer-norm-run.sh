# model::host::layer_norm: /tmp/xrun-lin (projections), /tmp/xrun-ln the same with LayerNorm (c25b3de).
set -u
cd /work/main
A="--steps 10 --warmup 2 --batch 32 --seq 128"
R=/tmp/r22
for round in 1 2; do
  for shape in bert-mini bert-small; do
    for b in lin ln; do
      /usr/bin/time -f "$b $shape %e s %P %M KB" /tmp/xrun-$b bench --backend cpu --shape $shape $A >> $R/bench-$b.jsonl 2>> $R/bench-time.txt
    done
  done
done
echo done > $R/done
