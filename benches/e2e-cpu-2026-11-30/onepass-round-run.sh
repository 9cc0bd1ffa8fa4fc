# AdamW in one pass and host attention in evaluation (70d2ee8), side by side with PyTorch
set -u
cd /work/main
X=/tmp/xrun-70d2ee8
G='sweep.grid={"pretrain.objective"=["none","mlm"]}'
/usr/bin/time -v -o /tmp/sbs6/pytorch-time.txt /work/torchenv/bin/python benches/e2e_hf.py --objectives none,mlm > /tmp/sbs6/pytorch.jsonl 2> /tmp/sbs6/pytorch.log
/usr/bin/time -v -o /tmp/sbs6/xrun-length-time.txt $X experiments/clue_tnews.toml --jobs 2 --set model.norm=post --set "$G" --set 'pretrain.batching="length"' --set 'finetune.batching="length"' --set experiment.output_dir=/tmp/sbs6/out-length > /tmp/sbs6/xrun-length.log 2>&1
/usr/bin/time -v -o /tmp/sbs6/xrun-random-time.txt $X experiments/clue_tnews.toml --jobs 2 --set model.norm=post --set "$G" --set experiment.output_dir=/tmp/sbs6/out-random > /tmp/sbs6/xrun-random.log 2>&1
echo all done > /tmp/sbs6/done
