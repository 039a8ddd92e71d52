"""Evaluates a labelled set with the DESIGN §5 protocol and writes report.json.

  python -m launch.evaluate --config=configs/digits_lt.py --workdir=runs/digits --set=synthetic
  python -m launch.evaluate --config=configs/digits_lt.py --workdir=runs/rand --set=random
  --set: synthetic | synthetic:PATH/synthetic.npz | random | herding | full
"""

from absl import app, flags

from launch import _common
from ltdd_jax import evaluate, pipeline

_SET = flags.DEFINE_string("set", "synthetic", "synthetic[:PATH] | random | herding | full")


def main(argv):
  del argv
  _common.quiet_libraries()
  report = pipeline.stage_evaluate(_common.CONFIG.value, _common.WORKDIR.value, _SET.value)
  print(evaluate.format_report(report))


if __name__ == "__main__":
  app.run(main)
