"""Grouping-hypothesis analysis from trained experts: accuracy vs count (flat and per-group experts)
and each class's share of the expert's parameter movement. Trains missing experts first.

  python -m launch.analyze_groups --config=configs/digits_lt.py --workdir=runs/digits_groups
"""

import json


from launch import _common


def main(argv):
  del argv
  # Imported once the workdir is locked: a second run on it fails before JAX loads.
  from ltdd_jax.methods import analysis  # pylint: disable=g-import-not-at-top
  from ltdd_jax.run import pipeline  # pylint: disable=g-import-not-at-top
  _common.quiet_libraries()
  config, workdir = _common.CONFIG.value, _common.WORKDIR.value
  ctx = pipeline.setup(config, workdir, stages=("experts",))  # It reads the experts alone.
  flat, _ = pipeline.stage_experts(ctx)
  grouping = pipeline.stage_grouping(ctx)
  sets = pipeline.stage_group_experts(ctx, grouping, stage1=False)
  within = {g: sets[f"group_{g}"][0] for g in range(grouping.num_groups) if f"group_{g}" in sets}
  report = analysis.analyze(ctx.data, grouping, flat, within, ctx.workdir,
                            ctx.specs.protocol.test_batch_size)
  print("groups:", grouping.groups)
  print("flat experts, accuracy vs count:", json.dumps(report["flat"]["pearson_log_count"]))
  for g, r in report["group_experts"].items():
    print(f"group {g} experts, accuracy vs count (pearson log):", r["pearson_log_count"],
          "| flat experts on the same classes:", report["flat_within_groups"][g]["pearson_log_count"])
  print("movement share vs data share:", report["movement_vs_data"])
  for row in report["bias_by_epoch"]:
    print(f"epoch {row['epoch']}: flat balanced acc {row['flat_balanced_acc']:.1f}, count bias "
          f"(pearson log) {row['flat_pearson_log_count']:.2f}; within-group head-tail gap: flat "
          f"experts {row['mean_flat_gap']}, group experts {row['mean_group_gap']}")
  print(f"wrote {ctx.workdir}/groups_report.json and groups_analysis.png")


if __name__ == "__main__":
  _common.run(main)
