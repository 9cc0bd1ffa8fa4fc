# Headline with length batching shipped (clue_tnews.toml sets batching = "length"), side by side
set -u
cd /work/main
X=/tmp/xrun-len  # built from be9e456; experiments/clue_tnews.toml with batching = "length" (the commit that ships it)
G='sweep.grid={"pretrain.objective"=["none","mlm"]}'
R=(--set 'pretrain.batching="random"' --set 'finetune.batching="random"')
/usr/bin/time -v -o /tmp/r8/headline-length-time.txt $X experiments/clue_tnews.toml --jobs 2 --set experiment.output_dir=/tmp/r8/head-length > /tmp/r8/headline-length.log 2>&1
/usr/bin/time -v -o /tmp/r8/pytorch-time.txt /work/torchenv/bin/python benches/e2e_hf.py --objectives none,mlm > /tmp/r8/pytorch.jsonl 2> /tmp/r8/pytorch.log
/usr/bin/time -v -o /tmp/r8/e2e-length-time.txt $X experiments/clue_tnews.toml --jobs 2 --set model.norm=post --set "$G" --set experiment.output_dir=/tmp/r8/e2e-length > /tmp/r8/e2e-length.log 2>&1
/usr/bin/time -v -o /tmp/r8/e2e-random-time.txt $X experiments/clue_tnews.toml --jobs 2 --set model.norm=post --set "$G" "${R[@]}" --set experiment.output_dir=/tmp/r8/e2e-random > /tmp/r8/e2e-random.log 2>&1
/usr/bin/time -v -o /tmp/r8/headline-random-time.txt $X experiments/clue_tnews.toml --jobs 2 "${R[@]}" --set experiment.output_dir=/tmp/r8/head-random > /tmp/r8/headline-random.log 2>&1
echo all done > /tmp/r8/done
# Run afterwards, one at a time, on the idle machine:
# /usr/bin/time -v -o /tmp/r8/headline-length-1proc-time.txt $X experiments/clue_tnews.toml --set experiment.output_dir=/tmp/r8/head-length-1proc
# /usr/bin/time -v -o /tmp/r8/methods-time.txt $X experiments/fewclue_methods.toml --jobs 2 --set experiment.output_dir=/tmp/r8/head-length   # on the headline's cache
