import json

import numpy as np

from ltdd_jax.methods import analysis, grouping
from ltdd_jax.run import pipeline


def test_correlation_signs():
  counts = np.array([100, 50, 20, 10])
  assert analysis.correlation([90, 80, 60, 40], counts)["spearman"] == 1.0
  assert analysis.correlation([40, 60, 80, 90], counts)["spearman"] == -1.0
  assert np.isnan(analysis.correlation([50, 50, 50, 50], counts)["spearman"])


def test_analysis_report_on_tiny_experts(tiny, tmp_path):
  config, data, flat = tiny
  groups = grouping.frequency_grouping(data.counts, 3.0)
  config = config.copy_and_resolve_references()
  config.experts.directory = str(tmp_path / "experts")
  sets = pipeline.stage_group_experts(pipeline.setup(config, tmp_path, data), groups, stage1=False)
  within = {int(name.split("_")[1]): s for name, (s, _) in sets.items()}
  report = analysis.analyze(data, groups, flat, within, tmp_path, batch_size=100)
  shares = np.asarray(report["movement_share_per_epoch"])
  assert shares.shape == (config.experts.epochs, 10)
  np.testing.assert_allclose(shares.sum(1), 1.0, rtol=1e-5)
  assert len(report["flat"]["per_class_acc"]) == 10
  assert set(report["group_experts"]) == {g for g, c in enumerate(groups.groups) if len(c) > 1}
  saved = json.loads((tmp_path / "groups_report.json").read_text())
  assert saved["grouping"]["groups"] == [list(g) for g in groups.groups]
  assert (tmp_path / "groups_analysis.png").exists()
  rows = report["bias_by_epoch"]
  assert [r["epoch"] for r in rows] == analysis.default_epochs(config.experts.epochs)
  multi = {g for g, c in enumerate(groups.groups) if len(c) > 1}
  assert all(set(r["group_gap"]) == set(r["flat_gap"]) == multi for r in rows)
  # At the last epoch the flat figures are the report's own.
  np.testing.assert_allclose(rows[-1]["flat_balanced_acc"], np.mean(report["flat"]["per_class_acc"]))


def test_within_group_gap_is_head_minus_tail_of_the_group():
  counts = np.array([5, 100, 10, 50])
  # Group (1, 2, 3): head class 1 (100 images), tail class 2 (10); accuracies in group order.
  assert analysis.within_group_gap(np.array([90.0, 30.0, 60.0]), counts, (1, 2, 3)) == 60.0
  assert analysis.within_group_gap(np.array([20.0, 70.0]), counts, (3, 2)) == -50.0
  assert analysis.default_epochs(40) == [10, 20, 30, 40]


def test_movement_share_equals_per_class_gradients(tiny):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ltdd_jax.core import ensemble  # pylint: disable=g-import-not-at-top
  _, data, flat = tiny
  images, labels = data.train_images[:60], data.train_labels[:60]
  shares = analysis.movement_shares(flat, images, labels, chunk=25)
  apply_fn = ensemble.make_apply(flat.model)
  trajectory = flat.load(0)
  theta = jax.tree.map(lambda x: x[1], trajectory)
  delta = jax.tree.map(lambda x: x[2] - x[1], trajectory)
  proj = []
  for c in range(10):
    mask = jnp.asarray(labels == c, jnp.float32)
    loss = lambda p, m=mask: jnp.sum(m * -jnp.take_along_axis(
        jax.nn.log_softmax(apply_fn(p, images)), jnp.asarray(labels)[:, None], 1)[:, 0])
    grad = jax.grad(loss)(theta)
    proj.append(-sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grad),
                                                          jax.tree.leaves(delta))))
  proj = np.asarray(proj)
  np.testing.assert_allclose(shares[1], proj / proj.sum(), rtol=1e-3, atol=1e-5)
