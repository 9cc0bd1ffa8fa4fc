# The LM head's target log-probabilities in one pass, on AR pretraining (its head scores every
# real token): 100 steps of the headline's AR pretraining, split 0, from an empty cache, before
# (/tmp/xrun-att, 6d5fbdc) and after (/tmp/xrun-lp), alternating, two rounds.
set -u
cd /work/main
R=/tmp/r12
for round in 1 2; do
  for v in att lp; do
    rm -rf $R/ar-$v
    /usr/bin/time -f "$v ar %e s %P %M KB" /tmp/xrun-$v experiments/clue_tnews.toml -q \
      --set 'sweep.grid={"pretrain.objective"=["ar"]}' --set 'sweep.split=[0]' \
      --set pretrain.steps=100 --set pretrain.eval_every=50 --trial objective=ar_split=0 \
      --until pretrain --set experiment.output_dir=$R/ar-$v 2>> $R/ar-time.txt
  done
done
