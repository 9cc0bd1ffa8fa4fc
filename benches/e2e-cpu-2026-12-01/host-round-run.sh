# End to end after this day's CPU changes (allocator, GELU, attention's softmax, LM head's
# log-probabilities on rayon's pool), side by side with the binary before them and PyTorch,
# each from an empty cache, one after the other on the idle machine.
set -u
cd /work/main
NEW=/tmp/xrun-lp    # built from the log-probabilities commit
OLD=/tmp/xrun-base  # built from cfd6d89, the last commit of 2026-11-30
R=/tmp/r13
mkdir -p $R
G='sweep.grid={"pretrain.objective"=["none","mlm"]}'
/usr/bin/time -v -o $R/headline-new-time.txt $NEW experiments/clue_tnews.toml --jobs 2 --set experiment.output_dir=$R/head-new > $R/headline-new.log 2>&1
/usr/bin/time -v -o $R/pytorch-time.txt /work/torchenv/bin/python benches/e2e_hf.py --objectives none,mlm > $R/pytorch.jsonl 2> $R/pytorch.log
/usr/bin/time -v -o $R/e2e-new-time.txt $NEW experiments/clue_tnews.toml --jobs 2 --set model.norm=post --set "$G" --set experiment.output_dir=$R/e2e-new > $R/e2e-new.log 2>&1
/usr/bin/time -v -o $R/e2e-old-time.txt $OLD experiments/clue_tnews.toml --jobs 2 --set model.norm=post --set "$G" --set experiment.output_dir=$R/e2e-old > $R/e2e-old.log 2>&1
/usr/bin/time -v -o $R/headline-old-time.txt $OLD experiments/clue_tnews.toml --jobs 2 --set experiment.output_dir=$R/head-old > $R/headline-old.log 2>&1
echo all done > $R/done
