import json

import numpy as np

from ltdd_jax import analysis, grouping, hierarchical


def test_correlation_signs():
  counts = np.array([100, 50, 20, 10])
  assert analysis.correlation([90, 80, 60, 40], counts)["spearman"] == 1.0
  assert analysis.correlation([40, 60, 80, 90], counts)["spearman"] == -1.0
  assert np.isnan(analysis.correlation([50, 50, 50, 50], counts)["spearman"])


def test_analysis_report_on_tiny_experts(tiny, tmp_path):
  config, data, flat = tiny
  groups = grouping.frequency_grouping(data.counts, 3.0)
  _, _, within = hierarchical.group_expert_sets(config, data, groups, tmp_path, stage1=False)
  report = analysis.analyze(config, data, groups, flat, {g: s for g, (s, _) in within.items()},
                            tmp_path)
  shares = np.asarray(report["movement_share_per_epoch"])
  assert shares.shape == (config.experts.epochs, 10)
  np.testing.assert_allclose(shares.sum(1), 1.0, rtol=1e-5)
  assert len(report["flat"]["per_class_acc"]) == 10
  assert set(report["group_experts"]) == {g for g, c in enumerate(groups.groups) if len(c) > 1}
  saved = json.loads((tmp_path / "groups_report.json").read_text())
  assert saved["grouping"]["groups"] == [list(g) for g in groups.groups]
  assert (tmp_path / "groups_analysis.png").exists()
