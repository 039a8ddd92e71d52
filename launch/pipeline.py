"""The main job: experts -> distillation -> evaluation -> report.json (resumable).

  python -m launch.pipeline --config=configs/digits_lt.py --workdir=runs/digits
  python -m launch.pipeline --config=configs/digits_lt.py --config.method=random --workdir=runs/rand
"""


from launch import _common


def main(argv):
  del argv
  # Imported once the workdir is locked: a second run on it fails before JAX loads.
  from ltdd_jax.evaluation import report as report_lib  # pylint: disable=g-import-not-at-top
  from ltdd_jax.run import pipeline  # pylint: disable=g-import-not-at-top
  _common.quiet_libraries()
  report = pipeline.run_pipeline(_common.CONFIG.value, _common.WORKDIR.value)
  print(report_lib.format_report(report))
  print(f"wall time {report['wall_seconds']:.0f}s; outputs in {_common.WORKDIR.value}")


if __name__ == "__main__":
  _common.run(main)
