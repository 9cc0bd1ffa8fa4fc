# Heads copied on the host (f513f6e), side by side with PyTorch
set -u
cd /work/main
X=/tmp/xrun-heads  # built from f513f6e
G='sweep.grid={"pretrain.objective"=["none","mlm"]}'
/usr/bin/time -v -o /tmp/sbs7/pytorch-time.txt /work/torchenv/bin/python benches/e2e_hf.py --objectives none,mlm > /tmp/sbs7/pytorch.jsonl 2> /tmp/sbs7/pytorch.log
/usr/bin/time -v -o /tmp/sbs7/xrun-length-time.txt $X experiments/clue_tnews.toml --jobs 2 --set model.norm=post --set "$G" --set 'pretrain.batching="length"' --set 'finetune.batching="length"' --set experiment.output_dir=/tmp/sbs7/out-length > /tmp/sbs7/xrun-length.log 2>&1
/usr/bin/time -v -o /tmp/sbs7/xrun-random-time.txt $X experiments/clue_tnews.toml --jobs 2 --set model.norm=post --set "$G" --set experiment.output_dir=/tmp/sbs7/out-random > /tmp/sbs7/xrun-random.log 2>&1
echo all done > /tmp/sbs7/done
