"""Trains the expert trajectories (resumable) and prints their validation accuracy.

  python -m launch.experts --config=configs/digits_lt.py --workdir=runs/digits
"""

import json


from launch import _common


def main(argv):
  del argv
  # Imported once the workdir is locked: a second run on it fails before JAX loads.
  from ltdd_jax.run import pipeline  # pylint: disable=g-import-not-at-top
  _common.quiet_libraries()
  config, workdir = _common.CONFIG.value, _common.WORKDIR.value
  ctx = pipeline.setup(config, workdir, stages=("experts",))  # It trains the experts alone.
  expert_set, _ = pipeline.stage_experts(ctx)
  acc = pipeline.expert_validation_accuracy(ctx, expert_set)
  print(f"{expert_set.num_experts} experts x {expert_set.epochs} epochs in {expert_set.directory}")
  print("validation accuracy at the last epoch:", json.dumps(acc))


if __name__ == "__main__":
  _common.run(main)
