# Large tensors on the heap: tokens/s before and after mallopt(M_MMAP_THRESHOLD), against PyTorch
# eager f32, same shapes and batches, alternating, two rounds. /tmp/xrun-base was built from
# cfd6d89, /tmp/xrun-mm from the change (1 GiB); mm32 is the change with MALLOC_MMAP_THRESHOLD_
# at 32 MiB (glibc's own ceiling for its moving threshold).
set -u
cd /work/main
A="--steps 10 --warmup 2 --batch 32 --seq 128"
R=/tmp/r9  # copied here with an mmap- prefix
for round in 1 2; do
  for shape in bert-mini bert-small; do
    for v in base mm mm32; do
      X=/tmp/xrun-mm; E=""
      [ $v = base ] && X=/tmp/xrun-base
      [ $v = mm32 ] && E="MALLOC_MMAP_THRESHOLD_=33554432"
      env $E /usr/bin/time -f "$v $shape %e s %P %M KB" $X bench --backend cpu --shape $shape $A >> $R/bench-$v.jsonl 2>> $R/bench-time.txt
    done
    /usr/bin/time -f "pytorch $shape %e s %P %M KB" /work/torchenv/bin/python benches/pytorch_reference.py --device cpu --shape $shape $A >> $R/bench-pytorch.jsonl 2>> $R/bench-time.txt
  done
done
echo done > $R/done
