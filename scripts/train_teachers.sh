#!/usr/bin/env bash
# Reproduce the shipped teachers in assets/teachers/ (about 10 minutes on 2 CPU cores).
#   DATAFREE_DATA=../shared/data bash scripts/train_teachers.sh
# Fixed epochs and seeds: no checkpoint or setting is chosen by looking at the test set.
set -euo pipefail
out=${1:-assets/teachers}
datafree teacher train --dataset mnist --arch lenet5 --epochs 12 --seed 0 --out "$out/mnist_lenet5" --overwrite
datafree teacher train --dataset mnist --arch lenet5_nobn --epochs 12 --seed 0 --out "$out/mnist_lenet5_nobn" --overwrite
datafree teacher train --dataset fashion-mnist --arch convnet --arch-kwargs '{"width": 64, "depth": 3, "norm": "batch"}' \
    --augment flip-shift --epochs 15 --seed 0 --out "$out/fmnist_convnet" --overwrite
