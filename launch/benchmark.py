"""Runs (or resumes) the benchmark grid and writes results.csv, results.md, summary.md, figures.

  python -m launch.benchmark --config=configs/benchmark.py:profile=cpu --workdir=runs/bench
"""

import pathlib


from launch import _common
from ltdd_jax.run import benchmark


def main(argv):
  del argv
  _common.quiet_libraries()
  results = pathlib.Path(_common.WORKDIR.value) / "results.md"
  try:
    benchmark.run_grid(_common.CONFIG.value, _common.WORKDIR.value)
  except benchmark.CellsDivergedError:  # The grid finished around the cells named: its table.
    print(results.read_text())
    raise
  print(results.read_text())


if __name__ == "__main__":
  _common.run(main, lock_workdir=False)  # Each cell is locked while it runs.
