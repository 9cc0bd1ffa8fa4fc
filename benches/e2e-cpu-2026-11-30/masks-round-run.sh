# Bulk dropout masks and a share of the cores per --jobs process (the commit that adds both)
set -u
cd /work/main
X=/tmp/xrun-new2
G='sweep.grid={"pretrain.objective"=["none","mlm"]}'
/usr/bin/time -v -o /tmp/sbs5/pytorch-time.txt /work/torchenv/bin/python benches/e2e_hf.py --objectives none,mlm > /tmp/sbs5/pytorch.jsonl 2> /tmp/sbs5/pytorch.log
/usr/bin/time -v -o /tmp/sbs5/xrun-length-time.txt $X experiments/clue_tnews.toml --jobs 2 --set model.norm=post --set "$G" --set 'pretrain.batching="length"' --set 'finetune.batching="length"' --set experiment.output_dir=/tmp/sbs5/out-length > /tmp/sbs5/xrun-length.log 2>&1
/usr/bin/time -v -o /tmp/sbs5/xrun-random-time.txt $X experiments/clue_tnews.toml --jobs 2 --set model.norm=post --set "$G" --set experiment.output_dir=/tmp/sbs5/out-random > /tmp/sbs5/xrun-random.log 2>&1
echo e2e done > /tmp/sbs5/e2e-done
echo all done > /tmp/sbs5/done
