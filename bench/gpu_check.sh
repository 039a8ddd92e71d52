#!/usr/bin/env bash
# The whole GPU check for one H200 session, under 8 minutes; everything goes to one results file.
#   run from the repo root on the device:  bash bench/gpu_check.sh
#   the same steps shrunk, on this machine's CPU:  SMOKE=1 JAX_PLATFORMS=cpu bash bench/gpu_check.sh
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
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
data=.data/cifar10-train-jpeg.tar.gz
[ -f "$data" ] || data=../shared/data/cifar10-train-jpeg.tar.gz
# Sizes: the GPU's, or (SMOKE=1) a few seconds each, to check that every step still runs.
if [ "${SMOKE:-0}" = 1 ]; then
  width=8; steps=2; images=20; experts=2; expert_images=256; tests="test_structure"
  cell="--config.experts.num_experts=1 --config.experts.epochs=3 --config.distill.iterations=2"
  cell="$cell --config.distill.max_start_epoch=1 --config.distill.syn_steps=2 --config.evaluate.epochs=2"
  cell="$cell --config.evaluate.num_models=1 --config.model.width=8"
else
  width=128; steps=80; images=100; experts=8; expert_images=12406; tests=""
  cell="--config.evaluate.epochs=300"
fi
step() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }
{
  step "machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
  step "tests on ${JAX_PLATFORMS} (multi-device CPU tests excluded)"
  timeout 150 python3 -m pytest -q -x tests -k "not four_devices and not sharded and not uneven \
and not too_many and not cli and not benchmark and not selection ${tests:+and $tests}" -p no:cacheprovider
  step "conv implementations (second derivative)"
  timeout 60 python3 bench/conv_impl.py --width "$width" --syn_steps 10 --images "$images"
  step "meta-gradient, paper scale, IPC 10 (100 images) and IPC 50 (500 images), syn_steps $steps"
  timeout 90 python3 bench/meta_grad.py --skip_torch --width "$width" --syn_steps "$steps" \
    --memory_steps "10,$steps"
  timeout 90 python3 bench/meta_grad.py --skip_torch --width "$width" --syn_steps "$steps" \
    --images $((5 * images)) --batch_syn 256 --memory_steps "$steps"
  step "expert throughput"
  timeout 90 python3 bench/experts.py --experts "$experts" --epochs 3 --images "$expert_images" \
    --width "$width"
  step "reduced CIFAR-10-LT IF=100 IPC=10 cell: mtt and mtt+two_stage"
  C="--config=configs/cifar10_lt.py:profile=cpu,source=folder,test=holdout --config.data.train_path=$data"
  C="$C --config.experts.directory=/tmp/gpu_cell/experts $cell"
  timeout 120 python3 -m launch.pipeline $C --config.method=mtt --workdir=/tmp/gpu_cell/mtt
  timeout 60 python3 -m launch.evaluate $C --config.method=mtt+two_stage --set=synthetic:/tmp/gpu_cell/mtt/synthetic.npz \
    --workdir=/tmp/gpu_cell/mtt_two_stage
} 2>&1 | tee "$log"
