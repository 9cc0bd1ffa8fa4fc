# Bulk dropout masks only (each --jobs process with a pool as large as the machine). Afterwards, by hand:
# RAYON_NUM_THREADS=1 $X ... (the length line), output in masks-only-round-xrun-length-rayon1*
set -u
cd /work/main
X=/tmp/xrun-new
G='sweep.grid={"pretrain.objective"=["none","mlm"]}'
/usr/bin/time -v -o /tmp/sbs3/pytorch-time.txt /work/torchenv/bin/python benches/e2e_hf.py --objectives none,mlm > /tmp/sbs3/pytorch.jsonl 2> /tmp/sbs3/pytorch.log
/usr/bin/time -v -o /tmp/sbs3/xrun-length-time.txt $X experiments/clue_tnews.toml --jobs 2 --set model.norm=post --set "$G" --set 'pretrain.batching="length"' --set 'finetune.batching="length"' --set experiment.output_dir=/tmp/sbs3/out-length > /tmp/sbs3/xrun-length.log 2>&1
/usr/bin/time -v -o /tmp/sbs3/xrun-random-time.txt $X experiments/clue_tnews.toml --jobs 2 --set model.norm=post --set "$G" --set experiment.output_dir=/tmp/sbs3/out-random > /tmp/sbs3/xrun-random.log 2>&1
echo all done > /tmp/sbs3/done
