# Attention's softmax in one pass: tokens/s before (/tmp/xrun-gelu, dd2780a) and after (/tmp/xrun-att),
# same shapes and batches, alternating, two rounds; the files are copied here with an attention- prefix.
set -u
cd /work/main
A="--steps 10 --warmup 2 --batch 32 --seq 128"
R=/tmp/r11
for round in 1 2; do
  for shape in bert-mini bert-small; do
    for v in gelu att; do
      /usr/bin/time -f "$v $shape %e s %P %M KB" /tmp/xrun-$v bench --backend cpu --shape $shape $A >> $R/bench-$v.jsonl 2>> $R/bench-time.txt
    done
  done
done
echo done > $R/done
# Rounds 3 and 4, bert-mini only, run after it the same way (the second round's `att` figure was
# far below the others):
#   for r in 3 4; do for v in gelu att; do /usr/bin/time ... /tmp/xrun-$v bench --backend cpu \
#     --shape bert-mini $A >> $R/bench-$v.jsonl 2>> $R/bench-time.txt; done; done
