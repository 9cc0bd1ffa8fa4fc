# attention's batched products: /tmp/xrun-do built from 0d0bed5, /tmp/xrun-mm from 5d78a58.
set -u
cd /work/main
A="--steps 10 --warmup 2 --batch 32 --seq 128"
R=/tmp/r25
for round in 1 2; do
  for shape in bert-mini bert-small; do
    for b in do mm; do
      /usr/bin/time -f "$b $shape %e s %P %M KB" /tmp/xrun-$b bench --backend cpu --shape $shape $A >> $R/bench-$b.jsonl 2>> $R/bench-time.txt
    done
  done
done
echo done > $R/done
