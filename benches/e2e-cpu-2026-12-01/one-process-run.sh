# The headline study in one process (no --jobs: the pool has both cores), from an empty cache,
# with the binary after this day's changes (/tmp/xrun-par, AdamW and heads' merge on the pool
# included) and the one before them (/tmp/xrun-base, cfd6d89), one after the other.
set -u
cd /work/main
R=/tmp/r15
mkdir -p $R
for v in par base; do
  /usr/bin/time -v -o $R/one-process-$v-time.txt /tmp/xrun-$v experiments/clue_tnews.toml --set experiment.output_dir=$R/head-$v > $R/one-process-$v.log 2>&1
done
echo all done > $R/done
