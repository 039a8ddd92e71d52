"""Distils a synthetic set (training the experts first if missing); resumable with the same workdir.

  python -m launch.distill --config=configs/digits_lt.py --config.method=mtt --workdir=runs/digits
"""


from launch import _common


def main(argv):
  del argv
  # Imported once the workdir is locked: a second run on it fails before JAX loads.
  from ltdd_jax.run import pipeline  # pylint: disable=g-import-not-at-top
  _common.quiet_libraries()
  pipeline.stage_distill(pipeline.setup(_common.CONFIG.value, _common.WORKDIR.value))


if __name__ == "__main__":
  _common.run(main)
