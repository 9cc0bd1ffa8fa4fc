# AdamW's update and the heads' merge on rayon's pool: tokens/s before (/tmp/xrun-lp, 2891142) and after (/tmp/xrun-par),
# same shapes and batches, alternating, two rounds; the files are copied here with a pool- prefix.
set -u
cd /work/main
A="--steps 10 --warmup 2 --batch 32 --seq 128"
R=/tmp/r14
for round in 1 2; do
  for shape in bert-mini bert-small; do
    for v in lp par; do
      /usr/bin/time -f "$v $shape %e s %P %M KB" /tmp/xrun-$v bench --backend cpu --shape $shape $A >> $R/bench-$v.jsonl 2>> $R/bench-time.txt
    done
  done
done
echo done > $R/done
