#!/usr/bin/env bash
# The whole GPU check for one H200 session, under 8 minutes; everything goes to one results file.
#   run from the repo root on the device:  bash bench/gpu_check.sh
# Needs (carried): .whl/ with tensorflow-datasets, ml_collections and their missing deps, and
# .data/cifar10-train-jpeg.tar.gz (a copy of ../shared/data/...). Writes $OUT/gpu_results.txt.
set -u
out=${OUT:-bench/gpu_out}
mkdir -p "$out"
log="$out/gpu_results.txt"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
step() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }
{
  step "machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
  step "tests on GPU (multi-device CPU tests excluded)"
  timeout 150 python3 -m pytest -q -x tests -k "not four_devices and not sharded and not uneven \
and not too_many and not cli and not benchmark and not selection" -p no:cacheprovider
  step "conv implementations (second derivative)"
  timeout 60 python3 bench/conv_impl.py --width 128 --syn_steps 10 --images 100
  step "meta-gradient, paper scale, IPC 10 (100 images) and IPC 50 (500 images), syn_steps 80"
  timeout 90 python3 bench/meta_grad.py --skip_torch --syn_steps 80 --memory_steps 10,80
  timeout 90 python3 bench/meta_grad.py --skip_torch --syn_steps 80 --images 500 --batch_syn 256 \
    --memory_steps 80
  step "expert throughput"
  timeout 90 python3 bench/experts.py --experts 8 --epochs 3 --images 12406 --width 128
  step "reduced CIFAR-10-LT IF=100 IPC=10 cell: mtt and mtt+two_stage"
  C="--config=configs/cifar10_lt.py:profile=cpu,source=folder --config.data.train_path=.data/cifar10-train-jpeg.tar.gz"
  C="$C --config.experts.directory=/tmp/gpu_cell/experts --config.evaluate.epochs=300"
  timeout 120 python3 -m launch.pipeline $C --config.method=mtt --workdir=/tmp/gpu_cell/mtt
  timeout 60 python3 -m launch.evaluate $C --config.method=mtt+two_stage --set=synthetic:/tmp/gpu_cell/mtt/synthetic.npz \
    --workdir=/tmp/gpu_cell/mtt_two_stage
} 2>&1 | tee "$log"
