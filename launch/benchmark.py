"""Runs (or resumes) the benchmark grid and writes results.csv, results.md and figures.

  python -m launch.benchmark --config=configs/benchmark.py:profile=cpu --workdir=runs/bench
"""

import pathlib


from launch import _common
from ltdd_jax import benchmark


def main(argv):
  del argv
  _common.quiet_libraries()
  benchmark.run_grid(_common.CONFIG.value, _common.WORKDIR.value)
  print((pathlib.Path(_common.WORKDIR.value) / "results.md").read_text())


if __name__ == "__main__":
  _common.run(main)
