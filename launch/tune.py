"""Chooses settings on the validation split: every combination of tuning.search, resumable.

  python -m launch.tune --config=configs/tune.py:dataset=digits --workdir=runs/tune
"""

import pathlib

from launch import _common
from ltdd_jax.run import tuning


def main(argv):
  del argv
  _common.quiet_libraries()
  result = tuning.run_search(_common.CONFIG.value, _common.WORKDIR.value)
  print((pathlib.Path(_common.WORKDIR.value) / "selection.md").read_text())
  print(f"chosen: {result['chosen']}")


if __name__ == "__main__":
  _common.run(main, lock_workdir=False)  # Each cell is locked while it runs.
