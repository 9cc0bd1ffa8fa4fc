# Goal 1 on the CPU after the second round (/tmp/xrun-mm, built from 5d78a58) against PyTorch eager
# f32, same shapes, alternating, two rounds; the files are copied here with a final2- prefix.
set -u
cd /work/main
A="--steps 10 --warmup 2 --batch 32 --seq 128"
R=/tmp/r27
mkdir -p $R
for round in 1 2; do
  for shape in bert-mini bert-small; do
    /usr/bin/time -f "xrun $shape %e s %P %M KB" /tmp/xrun-mm bench --backend cpu --shape $shape $A >> $R/bench-xrun.jsonl 2>> $R/bench-time.txt
    /usr/bin/time -f "pytorch $shape %e s %P %M KB" /work/torchenv/bin/python benches/pytorch_reference.py --device cpu --shape $shape $A >> $R/bench-pytorch.jsonl 2>> $R/bench-time.txt
  done
done
echo done > $R/done
