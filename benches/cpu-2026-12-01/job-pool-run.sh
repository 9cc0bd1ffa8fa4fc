# The job on a thread of its own pool: /tmp/xrun-base built from f17bc68, /tmp/xrun-pool2 from the
# commit that runs CPU jobs inside their pool, before it set one malloc arena (job-pool- files).
# Three rounds alternating, both shapes at goal 1's sizes; then, as `--jobs 2` runs them, two processes at once with one thread each (short
# sequences, as fine-tuning's headlines), three rounds.
set -u
cd /work/main
export XRUN_DATA_ROOT=/work/shared/data
A="--steps 10 --warmup 2 --batch 32 --seq 128"
R=/tmp/r30
for round in 1 2 3; do
  for shape in bert-mini bert-small; do
    for b in base pool2; do
      /usr/bin/time -f "$b $shape %e s %P %M KB" /tmp/xrun-$b bench --backend cpu --shape $shape $A >> $R/bench-$b.jsonl 2>> $R/bench-time.txt
    done
  done
done
for round in 1 2 3; do
  for b in base pool2; do
    for seed in 1 2; do
      RAYON_NUM_THREADS=1 /tmp/xrun-$b bench --backend cpu --shape bert-mini --steps 10 --warmup 2 --batch 32 --seq 48 --min-len 8 --seed $seed > $R/pair-$seed.jsonl 2>/dev/null &
    done
    wait
    cat $R/pair-1.jsonl $R/pair-2.jsonl >> $R/jobs2-$b.jsonl
  done
done
echo done > $R/done
