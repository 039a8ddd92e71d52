import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ltdd_jax import models, parallel, seeds
from ltdd_jax.core import training
from ltdd_jax.evaluation import protocol as protocol_lib
from ltdd_jax.methods import grouping, two_stage
from ltdd_jax.run import specs

ONE_GROUP = grouping.Grouping((tuple(range(10)),), 10)


def test_soft_prediction_with_one_group_is_flat():
  within = np.random.default_rng(0).dirichlet(np.ones(10), size=(2, 7))
  scores = two_stage.combine(np.ones((2, 7, 1)), [within], ONE_GROUP, "soft")
  np.testing.assert_allclose(scores, within)


def test_hard_and_soft_agree_when_group_is_certain():
  g = grouping.Grouping(((0, 1), (2, 3, 4)), 5)
  rng = np.random.default_rng(1)
  certain = np.eye(2)[rng.integers(0, 2, 50)]
  within = [rng.dirichlet(np.ones(2), 50), rng.dirichlet(np.ones(3), 50)]
  soft = two_stage.combine(certain, within, g, "soft").argmax(-1)
  hard = two_stage.combine(certain, within, g, "hard").argmax(-1)
  np.testing.assert_array_equal(soft, hard)


def test_group_targets_are_the_group_projections_of_soft_labels():
  g = grouping.Grouping(((0, 2), (1,)), 3)
  soft = np.array([[0.5, 0.3, 0.2], [0.1, 0.8, 0.1]], np.float32)
  np.testing.assert_allclose(two_stage.group_targets(soft, g), [[0.7, 0.3], [0.2, 0.8]], rtol=1e-6)
  np.testing.assert_array_equal(two_stage.group_targets(np.array([2, 1]), g), [0, 1])


def test_two_stage_classifier_with_one_group_equals_flat(tiny):
  config, data, _ = tiny
  images, labels = data.train_images, data.train_labels
  mesh = parallel.make_mesh(1)
  protocol = specs.protocol(config)
  held_out = protocol_lib.HeldOut.of(data, "test")
  labelled = protocol_lib.LabelledSet(images, labels, labels, 0.05, 3, None, "random+two_stage")
  two = two_stage.evaluate_two_stage(protocol, two_stage.TwoStageSpec(ONE_GROUP), labelled,
                                     held_out, mesh)
  # Group 0's within-group networks draw from the seed + WITHIN_GROUP_NETWORKS streams.
  flat = protocol_lib.evaluate_set(
      dataclasses.replace(protocol, seed=seeds.offset(config.seed, seeds.WITHIN_GROUP_NETWORKS)),
      labelled, held_out, mesh)
  np.testing.assert_allclose(two["per_class_acc"], flat["per_class_acc"])
  assert two["group_acc"] == 100.0
  np.testing.assert_allclose(two["within_group_acc"], flat["test_acc_mean"])


def test_two_stage_groups_images_by_assigned_class_not_soft_label_argmax(tiny, monkeypatch):
  # Learned soft labels can put most mass on a head class (DATM at IF 100, IPC 1): every image
  # here "looks like" class 0, yet each group's networks must still train on its own classes.
  config, data, _ = tiny
  calls, train = [], protocol_lib.train_networks
  def recording(protocol, model, train_set, *args, **kwargs):
    calls.append((len(train_set), model.head.features, np.asarray(train_set.targets).shape))
    return train(protocol, model, train_set, *args, **kwargs)
  monkeypatch.setattr(protocol_lib, "train_networks", recording)
  labels = np.arange(10, dtype=np.int32)
  images = np.stack([data.train_images[data.train_labels == c][0] for c in labels])
  soft = np.full((10, 10), 0.02, np.float32)
  soft[:, 0] = 0.82
  two_groups = grouping.Grouping((tuple(range(5)), tuple(range(5, 10))), 10)
  labelled = protocol_lib.LabelledSet(images, labels, soft, 0.05, 2, 1, "datm+two_stage")
  report = two_stage.evaluate_two_stage(
      specs.protocol(config), two_stage.TwoStageSpec(two_groups), labelled,
      protocol_lib.HeldOut.of(data, "test"), parallel.make_mesh(1))
  assert np.isfinite(report["test_acc_mean"]) and 0.0 <= report["within_group_acc"] <= 100.0
  # The group network sees all 10 images; each within-group network the 5 of its own classes.
  assert calls == [(10, 2, (10, 2)), (5, 5, (5, 5)), (5, 5, (5, 5))]
  np.testing.assert_allclose(two_stage.within_targets(soft, two_groups, 1, np.arange(5, 10)),
                             np.full((5, 5), 0.2), rtol=1e-6)


def test_packed_targets_hold_group_projections_and_own_group_within_targets():
  g = grouping.Grouping(((0, 2), (1,)), 3)
  soft = np.array([[0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]], np.float32)
  labels = np.array([0, 1, 2])
  spec = two_stage.TwoStageSpec(g)
  labelled = protocol_lib.LabelledSet(np.zeros((3, 4, 4, 1)), labels, soft, 0.1, 1, 1, "datm")
  group, within = two_stage.stage_targets(spec, labelled, {})
  packed = two_stage.pack_targets(group, within, g)
  chex.assert_shape(packed, (3, 2 + 3))
  np.testing.assert_allclose(packed[:, :2], two_stage.group_targets(soft, g), rtol=1e-6)
  # Group 0's head (classes 0, 2): images 0 and 2, renormalised; image 1 (group 1) has none.
  np.testing.assert_allclose(packed[:, 2:4], [[5 / 7, 2 / 7], [0, 0], [0.25, 0.75]], rtol=1e-6)
  np.testing.assert_allclose(packed[:, 4], [0, 1, 0])  # the one-class group's head


def test_shared_within_head_gets_no_gradient_from_other_groups_images():
  g = grouping.Grouping(((0, 1), (2, 3, 4)), 5)
  spec = models.ModelSpec(width=2, depth=1)
  sizes = (g.num_groups, *g.group_sizes)
  net = models.Classifier(models.make_backbone(spec), models.make_multi_head(spec, sizes))
  images = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4, 4, 1)), jnp.float32)
  params = net.init(jax.random.key(0), images)["params"]
  labels = np.array([0, 1, 0, 1, 1, 0])  # group 0's classes only

  def loss(p, labels):
    within = [(np.flatnonzero(np.isin(labels, classes)),
               g.within_label_map(k)[labels[np.isin(labels, classes)]])
              for k, classes in enumerate(g.groups)]
    targets = jnp.asarray(two_stage.pack_targets(g.group_of[labels], within, g))
    return training.segmented_cross_entropy(net.apply({"params": p}, images), targets, sizes)

  grads = jax.grad(loss)(params, labels)["head"]
  chex.assert_trees_all_equal(grads["head_2"], jax.tree.map(jnp.zeros_like, grads["head_2"]))
  assert all(float(jnp.abs(x).sum()) > 0 for x in jax.tree.leaves(grads["head_1"]))
  mixed = jax.grad(loss)(params, np.array([0, 1, 2, 3, 4, 2]))["head"]
  assert all(float(jnp.abs(x).sum()) > 0 for x in jax.tree.leaves(mixed["head_2"]))


def test_shared_two_stage_trains_one_network_of_group_and_within_heads(tiny, monkeypatch):
  config, data, _ = tiny
  calls, train = [], protocol_lib.train_networks
  def recording(protocol, model, train_set, *args, **kwargs):
    calls.append((len(train_set), models.head_segments(model), np.asarray(train_set.targets).shape))
    return train(protocol, model, train_set, *args, **kwargs)
  monkeypatch.setattr(protocol_lib, "train_networks", recording)
  labels = np.repeat(np.arange(10, dtype=np.int32), 2)
  images = np.stack([data.train_images[data.train_labels == c][i] for c in range(10)
                     for i in range(2)])
  groups = grouping.Grouping(((0, 1, 2), tuple(range(3, 10))), 10)
  labelled = protocol_lib.LabelledSet(images, labels, labels, 0.05, 2, 2, "mtt+two_stage")
  report = two_stage.evaluate_two_stage(
      specs.protocol(config), two_stage.TwoStageSpec(groups, arch="shared"), labelled,
      protocol_lib.HeldOut.of(data, "test"), parallel.make_mesh(1))
  assert calls == [(20, (2, 3, 7), (20, 12))]
  assert report["two_stage_arch"] == "shared" and np.isfinite(report["test_acc_mean"])
  assert 0 <= report["group_acc"] <= 100 and 0 <= report["within_group_acc"] <= 100


def test_group_stage_on_real_images_draws_as_stage1_says():
  g = grouping.Grouping(((0, 1, 2), (3,)), 4)
  labels = np.array([0, 0, 1, 2, 3, 3])
  real = protocol_lib.LabelledSet(np.zeros((6, 4, 4, 1)), labels, labels, 0.1, 1, None, "full",
                                  real=True)
  by_group = two_stage.TwoStageSpec(g)
  balance, strata = two_stage.stage1_draws(by_group, real)
  assert balance.sampling == "class_balanced" and balance.num_strata == 2
  np.testing.assert_array_equal(strata, [0, 0, 0, 0, 1, 1])
  by_class = dataclasses.replace(by_group, stage1=training.Balance("by_class", "ce", "dataset"))
  balance, strata = two_stage.stage1_draws(by_class, real)
  assert balance.sampling == "class_balanced" and balance.num_strata == 4
  np.testing.assert_array_equal(strata, labels)
  distilled = dataclasses.replace(real, real=False)
  assert two_stage.stage1_draws(by_class, distilled) == (training.Balance(), None)
