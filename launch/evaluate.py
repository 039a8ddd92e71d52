"""Evaluates a labelled set with the DESIGN §5 protocol and writes report.json.

  python -m launch.evaluate --config=configs/digits_lt.py --workdir=runs/digits --set=synthetic
  python -m launch.evaluate --config=configs/digits_lt.py --workdir=runs/rand --set=random
  python -m launch.evaluate --config=configs/digits_lt.py --workdir=runs/rand --set=full --split=validation
  --set: synthetic | synthetic:PATH/synthetic.npz | random | herding | full
A `+two_stage` (or `+hierarchical`) suffix on --config.method evaluates with the two-stage classifier.
"""

from absl import flags

from launch import _common

_SET = flags.DEFINE_string("set", "synthetic", "synthetic[:PATH] | random | herding | full")
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "validation"],
                           "test: report.json; validation: validation_report.json (tuning).")


def main(argv):
  del argv
  # Imported once the workdir is locked: a second run on it fails before JAX loads.
  from ltdd_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  from ltdd_jax.run import pipeline  # pylint: disable=g-import-not-at-top
  _common.quiet_libraries()
  ctx = pipeline.setup(_common.CONFIG.value, _common.WORKDIR.value, stages=())
  result = pipeline.stage_evaluate(ctx, _SET.value, ctx.method.two_stage, _SPLIT.value)
  print(report.format_report(result))


if __name__ == "__main__":
  _common.run(main)
