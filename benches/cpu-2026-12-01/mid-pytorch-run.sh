# /tmp/xrun-do (0d0bed5) against PyTorch eager f32, before the batched products' change.
set -u
cd /work/main
A="--steps 10 --warmup 2 --batch 32 --seq 128"
R=/tmp/r24
for round in 1 2; do
  for shape in bert-mini bert-small; do
    /usr/bin/time -f "xrun $shape %e s %P %M KB" /tmp/xrun-do bench --backend cpu --shape $shape $A >> $R/bench-xrun.jsonl 2>> $R/bench-time.txt
    /usr/bin/time -f "pytorch $shape %e s %P %M KB" /work/torchenv/bin/python benches/pytorch_reference.py --device cpu --shape $shape $A >> $R/bench-pytorch.jsonl 2>> $R/bench-time.txt
  done
done
echo done > $R/done
