# The headline study in one process (no --jobs: the pool has both cores), from an empty cache,
# with the binary after the second round of host operations (/tmp/xrun-mm, built from 5d78a58:
# projections, LayerNorm, dropout's draw and attention's products) and the one before them
# (/tmp/xrun-base, built from f2dad15), one after the other on the idle machine.
set -u
cd /work/main
R=/tmp/r26
mkdir -p $R
for v in mm base; do
  /usr/bin/time -v -o $R/gemm-round-$v-time.txt /tmp/xrun-$v experiments/clue_tnews.toml --set experiment.output_dir=$R/head-$v > $R/gemm-round-$v.log 2>&1
done
echo all done > $R/done
