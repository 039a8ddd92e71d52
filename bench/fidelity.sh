#!/usr/bin/env bash
# Reference-fidelity measurement on CIFAR-10-LT (shared JPEG copy, `cpu` profile, holdout test):
# mtt / datm / ltdd at IPC 10 for IF 10 and IF 100 on experts with PyTorch's initialisation (the
# default), then the experts' validation accuracy with PyTorch's vs Flax's initialisation.
#   bash bench/fidelity.sh [WORKDIR]        (resumable: rerun the same command after a stop)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-runs/fidelity}
CFG=configs/cifar10_lt.py:profile=cpu,source=folder,test=holdout
python -m launch.benchmark --config=configs/benchmark.py:profile=cpu --workdir="$W/grid" \
  --config.benchmark.ipcs='(10,)' --config.benchmark.methods='("mtt", "datm", "ltdd")'
for f in 100 10; do
  for init in torch flax; do
    experts=()
    if [ "$init" = torch ]; then experts=(--config.experts.directory="$W/grid/if${f}_experts"); fi
    python -m launch.experts --config="$CFG,imbalance_factor=$f" --config.model.init=$init \
      "${experts[@]}" --workdir="$W/experts_${init}_if$f" | tail -2
  done
done
