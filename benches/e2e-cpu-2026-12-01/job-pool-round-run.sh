# Files job-pool-round-* (the copies of $R's). End to end with each CPU job on a thread of its own
# pool (/tmp/xrun-pool3, with one malloc arena) and without (/tmp/xrun-base, f17bc68), side by
# side with PyTorch + transformers, each from an empty cache, one after the other on the idle
# machine: goal 2's none + mlm with --jobs 2, then the whole headline study in one process.
set -u
cd /work/main
export XRUN_DATA_ROOT=/work/shared/data
R=/tmp/r31
mkdir -p $R
G='sweep.grid={"pretrain.objective"=["none","mlm"]}'
for v in pool3 base; do
  /usr/bin/time -v -o $R/e2e-$v-time.txt /tmp/xrun-$v experiments/clue_tnews.toml --jobs 2 --set model.norm=post --set "$G" --set experiment.output_dir=$R/e2e-$v > $R/e2e-$v.log 2>&1
  cp $R/e2e-$v/clue_tnews/tables/tnews_test_accuracy.md $R/e2e-$v-table.md
done
/usr/bin/time -v -o $R/pytorch-time.txt /work/torchenv/bin/python benches/e2e_hf.py --objectives none,mlm > $R/pytorch.jsonl 2> $R/pytorch.log
for v in pool3 base; do
  /usr/bin/time -v -o $R/headline-$v-time.txt /tmp/xrun-$v experiments/clue_tnews.toml --set experiment.output_dir=$R/head-$v > $R/headline-$v.log 2>&1
  cp $R/head-$v/clue_tnews/tables/tnews_test_accuracy.md $R/headline-$v-table.md
done
echo all done > $R/done
