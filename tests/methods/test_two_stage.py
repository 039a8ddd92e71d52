import dataclasses

import numpy as np

from ltdd_jax import parallel, seeds
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
