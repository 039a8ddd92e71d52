"""Prints the long-tailed class counts and split sizes, and writes a PNG grid of a few images per class.

  python -m launch.inspect_data --config=configs/digits_lt.py --workdir=runs/digits_data
"""


from launch import _common


def main(argv):
  del argv
  # Imported once the workdir is locked: a second run on it fails before JAX loads.
  from ltdd_jax.run import data_summary  # pylint: disable=g-import-not-at-top
  _common.quiet_libraries()
  print(data_summary.inspect_data(_common.CONFIG.value, _common.WORKDIR.value))


if __name__ == "__main__":
  _common.run(main)
