"""Flags every launcher shares: --config (ml_collections file[:args]) and --workdir."""

from absl import flags
from ml_collections import config_flags

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
