"""Flags every launcher shares: --config (ml_collections file[:args]) and --workdir."""

import sys

from absl import app, flags
from ml_collections import config_flags

from ltdd_jax import errors

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/digits_lt.py or configs/cifar10_lt.py:profile=cpu. "
    "Override any key with --config.section.key=value.", lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints and outputs (resumable).")
flags.mark_flags_as_required(["config", "workdir"])


def quiet_libraries() -> None:
  """Keeps absl INFO lines of libraries (orbax logs every save) off the console; progress lines and
  results are printed by ltdd_jax itself. --verbosity=0 on the command line brings them back."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def run(main) -> None:
  """`app.run(main)`, with the errors ltdd_jax raises on purpose (bad config values, files, sets,
  workdirs; a mismatched resume; divergence) printed as one line and exit status 1. Any other
  exception is a bug and keeps its traceback."""

  def guarded(argv):
    try:
      return main(argv)
    except errors.Error as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)

  app.run(guarded)
