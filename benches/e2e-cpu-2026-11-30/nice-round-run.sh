set -u
# xrun-nice: 45dfced plus an uncommitted change that started --jobs trial processes at nice 10 while a shared stage was still to end (src/cluster/local.rs); old: 7a71cfd (the same xrun code as 45dfced)
cd /work/main
G='sweep.grid={"pretrain.objective"=["none","mlm"]}'
for v in nice old; do
  X=/tmp/sbs3/xrun-$v; [ $v = old ] && X=/tmp/xrun-s
  /usr/bin/time -v -o /tmp/sbs3/$v-time.txt $X experiments/clue_tnews.toml --jobs 2 --set model.norm=post --set "$G" --set 'pretrain.batching="length"' --set 'finetune.batching="length"' --set experiment.output_dir=/tmp/sbs3/out-$v > /tmp/sbs3/$v.log 2>&1
done
echo done > /tmp/sbs3/done
