set -u
cd /work/main
X=/var/cache/xrun/target/release/xrun
G='sweep.grid={"pretrain.objective"=["none","mlm"]}'
/usr/bin/time -v -o /tmp/sbs2/pytorch-time.txt /work/torchenv/bin/python benches/e2e_hf.py --objectives none,mlm > /tmp/sbs2/pytorch.jsonl 2> /tmp/sbs2/pytorch.log
/usr/bin/time -v -o /tmp/sbs2/xrun-length-time.txt $X experiments/clue_tnews.toml --jobs 2 --set model.norm=post --set "$G" --set 'pretrain.batching="length"' --set 'finetune.batching="length"' --set experiment.output_dir=/tmp/sbs2/out-length > /tmp/sbs2/xrun-length.log 2>&1
/usr/bin/time -v -o /tmp/sbs2/xrun-random-time.txt $X experiments/clue_tnews.toml --jobs 2 --set model.norm=post --set "$G" --set experiment.output_dir=/tmp/sbs2/out-random > /tmp/sbs2/xrun-random.log 2>&1
echo all done > /tmp/sbs2/done
