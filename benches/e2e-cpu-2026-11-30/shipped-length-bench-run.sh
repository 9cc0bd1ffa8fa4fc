# CPU tokens/s against PyTorch eager f32, same shapes and batches, alternating, two rounds
set -u
cd /work/main
X=/tmp/xrun-len
A="--steps 10 --warmup 2 --batch 32 --seq 128"
for round in 1 2; do
  for shape in bert-mini bert-small; do
    /usr/bin/time -f "%e s %P" $X bench --backend cpu --shape $shape $A >> /tmp/r8/bench-xrun.jsonl 2>> /tmp/r8/bench-xrun.err
    /usr/bin/time -f "%e s %P" /work/torchenv/bin/python benches/pytorch_reference.py --device cpu --shape $shape $A >> /tmp/r8/bench-pytorch.jsonl 2>> /tmp/r8/bench-pytorch.err
  done
done
echo done > /tmp/r8/bench-done
