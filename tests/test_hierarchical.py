import jax
import numpy as np
import pytest

from ltdd_jax import distill, evaluate, experts, grouping, hierarchical, matching, parallel
from ltdd_jax import synthetic, training

ONE_GROUP = grouping.Grouping((tuple(range(10)),), 10)


def test_soft_prediction_with_one_group_is_flat():
  within = np.random.default_rng(0).dirichlet(np.ones(10), size=(2, 7))
  scores = hierarchical.combine(np.ones((2, 7, 1)), [within], ONE_GROUP, "soft")
  np.testing.assert_allclose(scores, within)


def test_hard_and_soft_agree_when_group_is_certain():
  g = grouping.Grouping(((0, 1), (2, 3, 4)), 5)
  rng = np.random.default_rng(1)
  certain = np.eye(2)[rng.integers(0, 2, 50)]
  within = [rng.dirichlet(np.ones(2), 50), rng.dirichlet(np.ones(3), 50)]
  soft = hierarchical.combine(certain, within, g, "soft").argmax(-1)
  hard = hierarchical.combine(certain, within, g, "hard").argmax(-1)
  np.testing.assert_array_equal(soft, hard)


def test_two_stage_classifier_with_one_group_equals_flat(tiny):
  config, data, _ = tiny
  images, labels = data.train_images, data.train_labels
  mesh = parallel.make_mesh(1)
  protocol = evaluate.Protocol.from_config(config)
  labelled = evaluate.LabelledSet(images, labels, labels, 0.05, 3, None, "random+two_stage")
  two = hierarchical.evaluate_two_stage(protocol, hierarchical.TwoStageSpec(), data, ONE_GROUP,
                                        labelled, seed=config.seed, mesh=mesh)
  flat = evaluate.evaluate_set(protocol, data, labelled, seed=config.seed + 1, mesh=mesh)
  np.testing.assert_allclose(two["per_class_acc"], flat["per_class_acc"])
  assert two["group_acc"] == 100.0
  np.testing.assert_allclose(two["within_group_acc"], flat["test_acc_mean"])


def test_two_stage_groups_images_by_assigned_class_not_soft_label_argmax(tiny, monkeypatch):
  # Learned soft labels can put most mass on a head class (DATM at IF 100, IPC 1): every image
  # here "looks like" class 0, yet each group's networks must still train on its own classes.
  config, data, _ = tiny
  calls, train = [], evaluate.train_networks
  def recording(protocol, model, train_set, num_classes, *args, **kwargs):
    calls.append((len(train_set), num_classes, np.asarray(train_set.targets).shape))
    return train(protocol, model, train_set, num_classes, *args, **kwargs)
  monkeypatch.setattr(evaluate, "train_networks", recording)
  labels = np.arange(10, dtype=np.int32)
  images = np.stack([data.train_images[data.train_labels == c][0] for c in labels])
  soft = np.full((10, 10), 0.02, np.float32)
  soft[:, 0] = 0.82
  two_groups = grouping.Grouping((tuple(range(5)), tuple(range(5, 10))), 10)
  labelled = evaluate.LabelledSet(images, labels, soft, 0.05, 2, 1, "datm+two_stage")
  report = hierarchical.evaluate_two_stage(
      evaluate.Protocol.from_config(config), hierarchical.TwoStageSpec(), data, two_groups,
      labelled, seed=config.seed, mesh=parallel.make_mesh(1))
  assert np.isfinite(report["test_acc_mean"]) and 0.0 <= report["within_group_acc"] <= 100.0
  # The group network sees all 10 images; each within-group network the 5 of its own classes.
  assert calls == [(10, 2, (10, 2)), (5, 5, (5, 5)), (5, 5, (5, 5))]
  np.testing.assert_allclose(hierarchical.within_targets(soft, two_groups, 1, np.arange(5, 10)),
                             np.full((5, 5), 0.2), rtol=1e-6)


def test_hierarchical_loss_with_one_group_and_no_stage1_is_flat(tiny, tmp_path):
  config, data, expert_set = tiny
  config = config.copy_and_resolve_references()
  config.grouping.lambda_1 = 0.0
  objectives, weights = hierarchical.hierarchical_objectives(config, data, ONE_GROUP, tmp_path,
                                                           parallel.make_mesh(1))
  assert len(objectives) == 1 and weights == [config.grouping.lambda_2]
  flat = distill.flat_objective(config, data, expert_set, None)
  stage2 = objectives[0]
  jax.tree.map(np.testing.assert_array_equal, stage2.experts.expert_set.load_all(),
               flat.experts.expert_set.load_all())
  syn, _ = synthetic.initial_synthetic(config, data, expert_set)
  spec = matching.InnerSpec(config.distill.syn_steps, config.distill.batch_syn)
  pair = flat.sample(np.random.default_rng(0), 0, 2, 1)
  key = jax.random.key(0)
  args = (spec, config.dsa, syn["images"], syn["labels"], np.float32(0.05), pair, key)
  hier = sum(w * o.loss(*args) for w, o in zip(weights, objectives))
  np.testing.assert_allclose(hier, flat.loss(*args), rtol=1e-6)


def test_per_group_expert_sees_only_its_classes(tiny, tmp_path):
  config, data, _ = tiny
  config = config.copy_and_resolve_references()
  config.experts.num_experts, config.experts.epochs = 1, 1
  s = experts.train_experts(config, data, tmp_path / "g", parallel.make_mesh(1), classes=(3, 7))
  assert s.num_classes == 2 and s.classes == (3, 7)
  assert s.load(0)["head"]["kernel"].shape[-1] == 2
  images, labels = experts.subset_classes(data.train_images, data.train_labels, (3, 7))
  assert set(np.unique(labels)) == {0, 1}
  assert len(labels) == data.counts[3] + data.counts[7]
  with pytest.raises(ValueError, match="either a class subset or a label map"):
    experts.train_experts(config, data, tmp_path / "x", parallel.make_mesh(1), classes=(1,),
                          label_map=np.zeros(10, int))


def test_stage2_unrolls_match_their_experts_steps(tiny):
  """Each group's student unrolls in proportion to its experts' SGD steps per epoch, so that
  student steps per expert step stay comparable across objectives (the flat one unchanged)."""
  config, _, _ = tiny
  config = config.copy_and_resolve_references()
  config.experts.batch_size, config.distill.syn_steps = 256, 10
  counts = np.array([3900, 2340, 1400, 840, 503, 302, 181, 108, 65, 39])  # CIFAR-10-LT, IF 100
  flat_steps = 38  # ceil(9678 / 256)
  for classes, group_steps in (((0, 1, 2, 3), 34), ((4, 5, 6, 7), 5), ((8, 9), 1)):
    steps = hierarchical.matched_syn_steps(config, counts, classes)
    assert steps == max(1, round(10 * group_steps / flat_steps)), (classes, steps)
    expert_steps = config.distill.expert_epochs * group_steps
    assert steps / expert_steps <= 1.0  # never more student steps than the window's expert steps
  assert hierarchical.matched_syn_steps(config, counts, tuple(range(10))) == 10


def test_group_balanced_stage1_sees_every_group_equally(tiny):
  config, data, _ = tiny
  group_of = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
  labels = group_of[data.train_labels]
  balance = hierarchical.stage1_balance(config.grouping)
  spec = experts.expert_spec(config.experts, labels, 3, balance=balance)
  assert spec.sampling == "class_balanced"
  assert spec.steps_per_epoch == -(-len(labels) // config.experts.batch_size)  # as many as flat
  draws = np.concatenate([np.asarray(training.epoch_indices(jax.random.key(k), labels, spec, 3))
                          .ravel() for k in range(20)])
  shares = np.bincount(labels[draws], minlength=3) / len(draws)
  assert np.bincount(labels, minlength=3).max() > 3 * np.bincount(labels, minlength=3).min()
  np.testing.assert_allclose(shares, 1 / 3, atol=0.03)
  config = config.copy_and_resolve_references()
  config.grouping.stage1_sampling = "instance"
  spec = experts.expert_spec(config.experts, labels, 3,
                             balance=hierarchical.stage1_balance(config.grouping))
  assert spec.sampling == "instance"


def test_stage1_dam_weights_follow_the_group_experts_sampling(tiny, tmp_path):
  """DAM mimics the distribution the experts trained on: group-balanced group experts get uniform
  weights over groups, instance-sampled ones the groups' image counts. Neither is imbalanced
  enough for ED's classifier term (`grouping.ed_min_imbalance`)."""
  config, data, _ = tiny
  config = config.copy_and_resolve_references()
  config.method, config.grouping.lambda_2 = "ltdd+hierarchical", 0.0
  config.experts.num_experts, config.experts.epochs = 1, 1
  two_groups = grouping.Grouping(((0, 1, 2), tuple(range(3, 10))), 10)
  group_counts = np.array([data.counts[:3].sum(), data.counts[3:].sum()], np.float64)
  assert abs(group_counts[0] / group_counts.sum() - 0.5) > 0.05  # the groups are imbalanced
  for sampling, expected in (("class_balanced", [0.5, 0.5]),
                             ("instance", group_counts / group_counts.sum())):
    config.grouping.stage1_sampling = sampling
    objectives, _ = hierarchical.hierarchical_objectives(config, data, two_groups, tmp_path,
                                                         parallel.make_mesh(1))
    assert [o.name for o in objectives] == ["groups"]
    np.testing.assert_allclose(objectives[0].class_weights, expected, rtol=1e-6)
    assert objectives[0].classifier_experts is None


def test_expert_decoupling_only_where_the_experts_drew_imbalanced_classes(tiny, tmp_path):
  config, data, _ = tiny
  config = config.copy_and_resolve_references()
  config.method = "ltdd+hierarchical"
  counts = np.array([500, 100, 50])
  assert hierarchical.decoupled(config, counts, "instance")  # 10x: ED as in flat LTDD
  assert not hierarchical.decoupled(config, counts[1:], "instance")  # 2x
  assert not hierarchical.decoupled(config, counts, "class_balanced")  # drawn balanced
  config.grouping.ed_min_imbalance = 1.0  # ED on every objective
  assert hierarchical.decoupled(config, counts, "class_balanced")
  config.experts.num_experts, config.experts.epochs, config.experts.classifier_epochs = 1, 1, 1
  config.grouping.lambda_2 = 0.0
  two_groups = grouping.Grouping(((0, 1, 2), tuple(range(3, 10))), 10)
  objectives, _ = hierarchical.hierarchical_objectives(config, data, two_groups, tmp_path,
                                                       parallel.make_mesh(1))
  assert objectives[0].classifier_experts is not None
  config.method = "mtt+hierarchical"
  assert not hierarchical.decoupled(config, counts, "instance")
