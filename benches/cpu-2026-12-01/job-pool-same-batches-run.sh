# Goal 1 on the CPU after the job moved onto a thread of its own pool: /tmp/xrun-final (built from
# that commit) runs first, and PyTorch eager f32 replays its batch lengths (`--lengths-from`);
# alternating, three rounds; copied here with a job-pool-same-batches- prefix.
set -u
cd /work/main
A="--steps 10 --warmup 2 --batch 32 --seq 128"
R=/tmp/r32
mkdir -p $R
for round in 1 2 3; do
  for shape in bert-mini bert-small; do
    /usr/bin/time -f "xrun $shape %e s %P %M KB" /tmp/xrun-final bench --backend cpu --shape $shape $A > $R/last.jsonl 2>> $R/bench-time.txt
    cat $R/last.jsonl >> $R/bench-xrun.jsonl
    /usr/bin/time -f "pytorch $shape %e s %P %M KB" /work/torchenv/bin/python benches/pytorch_reference.py --device cpu --shape $shape $A --lengths-from $R/last.jsonl >> $R/bench-pytorch.jsonl 2>> $R/bench-time.txt
  done
done
echo done > $R/done
