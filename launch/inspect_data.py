"""Prints the long-tailed class counts and split sizes, and writes a PNG grid of a few images per class.

  python -m launch.inspect_data --config=configs/digits_lt.py --workdir=runs/digits_data
"""

from absl import app, flags
from ml_collections import config_flags

from ltdd_jax import inspect

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  print(inspect.inspect_data(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
  app.run(main)
