"""Distils a synthetic set (training the experts first if missing); resumable with the same workdir.

  python -m launch.distill --config=configs/digits_lt.py --config.method=mtt --workdir=runs/digits
"""


from launch import _common
from ltdd_jax.run import pipeline


def main(argv):
  del argv
  _common.quiet_libraries()
  pipeline.stage_distill(pipeline.setup(_common.CONFIG.value, _common.WORKDIR.value))


if __name__ == "__main__":
  _common.run(main)
