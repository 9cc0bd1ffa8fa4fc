# The LM head's target log-probabilities in one pass: tokens/s before (/tmp/xrun-att, 6d5fbdc) and after (/tmp/xrun-lp),
# same shapes and batches, alternating, two rounds; the files are copied here with a log-probs- prefix.
set -u
cd /work/main
A="--steps 10 --warmup 2 --batch 32 --seq 128"
R=/tmp/r12
for round in 1 2; do
  for shape in bert-mini bert-small; do
    for v in att lp; do
      /usr/bin/time -f "$v $shape %e s %P %M KB" /tmp/xrun-$v bench --backend cpu --shape $shape $A >> $R/bench-$v.jsonl 2>> $R/bench-time.txt
    done
  done
done
echo done > $R/done
