#!/usr/bin/env bash
# The paper's setting (§3.1) end to end on a GPU machine.  Usage: run.sh ADE_ROOT OUT_DIR
set -euo pipefail
ADE=${1:?usage: run.sh ADE_ROOT OUT_DIR}
OUT=${2:?usage: run.sh ADE_ROOT OUT_DIR}
MODELS=${MODELS:-"deeplabv3_resnet50 denseaspp_densenet121 danet_resnet50"}
EPOCHS=${EPOCHS:-40}
DEVICE=${DEVICE:-cuda}
WEIGHTS=${WEIGHTS:-imagenet}
mkdir -p "$OUT/data" "$OUT/runs" "$OUT/scores"

[ -f "$OUT/data/ade20k.h5" ] || testbed data import ade20k "$ADE" --size 512 --out "$OUT/data/ade20k.h5"
CLEAN="$OUT/data/ade20k.h5"

poison() { local name=$1; shift; [ -f "$OUT/data/$name.h5" ] || testbed poison "$CLEAN" "$@" --seed 0 --out "$OUT/data/$name.h5"; }
poison badnets-line          --attack badnets --trigger line --rate 0.1
poison badnets-semantic      --attack badnets --trigger semantic:grass
poison fgba-n-to-1-line      --attack fgba --preset n-to-1 --target wall --trigger line --rate 0.1
poison fgba-n-to-1-semantic  --attack fgba --preset n-to-1 --target wall --trigger semantic:wall
poison fgba-1-to-1-line      --attack fgba --preset 1-to-1 --source person --target palm --trigger line --rate 0.2
poison fgba-1-to-1-semantic  --attack fgba --preset 1-to-1 --source person --target palm --trigger semantic:wall

for model in $MODELS; do
  for set in ade20k badnets-line badnets-semantic fgba-n-to-1-line fgba-n-to-1-semantic fgba-1-to-1-line fgba-1-to-1-semantic; do
    run="$OUT/runs/$model--$set"
    if [ ! -f "$run/model.safetensors" ]; then
      resume=""; [ -d "$run" ] && resume="--resume"
      testbed train "$OUT/data/$set.h5" --model "$model" --epochs "$EPOCHS" --batch-size 4 \
        --optimizer sgd --schedule poly --lr 0.01 --aux-loss --backbone-weights "$WEIGHTS" \
        --device "$DEVICE" --seed 0 $resume --out "$run"
    fi
    testbed score "$run" --data "$OUT/data/$set.h5" --device "$DEVICE" --json > "$OUT/scores/$model--$set.json"
    # The paper's "Benign" rows: the clean model against each attacked test set.
    if [ "$set" = ade20k ]; then
      for att in badnets-line badnets-semantic fgba-n-to-1-line fgba-n-to-1-semantic fgba-1-to-1-line fgba-1-to-1-semantic; do
        testbed score "$run" --data "$OUT/data/$att.h5" --device "$DEVICE" --json > "$OUT/scores/$model--benign-vs-$att.json"
      done
    fi
  done
done
echo "scores in $OUT/scores/"
