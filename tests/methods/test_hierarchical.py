import jax
import jax.numpy as jnp
import numpy as np

from ltdd_jax.core import training
from ltdd_jax.methods import experts, grouping, hierarchical, synthetic
from ltdd_jax.run import pipeline, specs

ONE_GROUP = grouping.Grouping((tuple(range(10)),), 10)


def _context(config, data, root):
  """A run in `root` whose experts live there too."""
  config = config.copy_and_resolve_references()
  config.experts.directory = str(root / "experts")
  return pipeline.setup(config, root, data)


def test_hierarchical_loss_with_one_group_and_no_stage1_is_flat(tiny, tmp_path):
  config, data, expert_set = tiny
  config = config.copy_and_resolve_references()
  config.grouping.lambda_1 = 0.0
  ctx = _context(config, data, tmp_path)
  objectives = pipeline.hierarchical_objectives(ctx, ONE_GROUP)
  assert [o.weight for o in objectives] == [config.grouping.lambda_2]
  flat = pipeline.flat_objective(ctx, expert_set, None)
  stage2 = objectives[0]
  assert stage2.syn_steps == flat.syn_steps  # one group holds every class: the flat unroll
  jax.tree.map(np.testing.assert_array_equal, stage2.experts.expert_set.at_epoch(),
               flat.experts.expert_set.at_epoch())
  syn, _ = synthetic.initial_synthetic(ctx.specs.init, data, expert_set)
  pair = flat.sample(np.random.default_rng(0), 0, 2, 1)
  batch = {"images": jnp.asarray(syn["images"]), "targets": jnp.asarray(syn["labels"]),
           "lr": np.float32(0.05)}
  hier = sum(o.weight * o.loss(batch, pair, jax.random.key(0)) for o in objectives)
  np.testing.assert_allclose(hier, flat.loss(batch, pair, jax.random.key(0)), rtol=1e-6)


def test_per_group_expert_sees_only_its_classes(tiny, tmp_path):
  config, data, _ = tiny
  config = config.copy_and_resolve_references()
  config.experts.num_experts, config.experts.epochs, config.distill.max_start_epoch = 1, 2, 1
  ctx = _context(config, data, tmp_path)
  s = pipeline.train_expert_set(ctx, tmp_path / "g", experts.Labelling(2, (3, 7)))
  assert s.num_classes == 2 and s.labelling.classes == (3, 7)
  assert s.load(0)["head"]["kernel"].shape[-1] == 2
  images, labels = s.labelling.apply(data.train_images, data.train_labels)
  assert set(np.unique(labels)) == {0, 1}
  assert len(labels) == data.counts[3] + data.counts[7]


def test_stage2_unrolls_match_their_experts_steps(tiny):
  """Each group's student unrolls in proportion to its experts' SGD steps per epoch, so that
  student steps per expert step stay comparable across objectives (the flat one unchanged)."""
  config, _, _ = tiny
  config = config.copy_and_resolve_references()
  config.experts.batch_size, config.distill.syn_steps = 256, 10
  spec = specs.hierarchical_spec(config, specs.method(config))
  counts = np.array([3900, 2340, 1400, 840, 503, 302, 181, 108, 65, 39])  # CIFAR-10-LT, IF 100
  flat_steps = 38  # ceil(9678 / 256)
  for classes, group_steps in (((0, 1, 2, 3), 34), ((4, 5, 6, 7), 5), ((8, 9), 1)):
    steps = hierarchical.matched_syn_steps(spec, 10, counts, classes)
    assert steps == max(1, round(10 * group_steps / flat_steps)), (classes, steps)
    expert_steps = config.distill.expert_epochs * group_steps
    assert steps / expert_steps <= 1.0  # never more student steps than the window's expert steps
  assert hierarchical.matched_syn_steps(spec, 10, counts, tuple(range(10))) == 10


def test_group_balanced_stage1_sees_every_group_equally(tiny):
  config, data, _ = tiny
  group_of = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
  labels = group_of[data.train_labels]
  expert_spec = specs.expert_spec(config)
  spec = experts.train_spec(expert_spec, labels, 3, balance=specs.stage1(config))
  assert spec.sampling == "class_balanced"
  assert spec.steps_per_epoch == -(-len(labels) // config.experts.batch_size)  # as many as flat
  draws = np.concatenate([np.asarray(training.epoch_indices(jax.random.key(k), labels, spec))
                          .ravel() for k in range(20)])
  shares = np.bincount(labels[draws], minlength=3) / len(draws)
  assert np.bincount(labels, minlength=3).max() > 3 * np.bincount(labels, minlength=3).min()
  np.testing.assert_allclose(shares, 1 / 3, atol=0.03)
  config = config.copy_and_resolve_references()
  config.grouping.stage1_sampling = "instance"
  spec = experts.train_spec(expert_spec, labels, 3, balance=specs.stage1(config))
  assert spec.sampling == "instance"


def test_stage1_dam_weights_follow_the_group_experts_sampling(tiny, tmp_path):
  """DAM mimics the distribution the experts trained on: group-balanced group experts get uniform
  weights over groups, instance-sampled ones the groups' image counts, class-balanced (by_class)
  ones the groups' numbers of classes. Neither is imbalanced
  enough for ED's classifier term (`grouping.ed_min_imbalance`)."""
  config, data, _ = tiny
  config = config.copy_and_resolve_references()
  config.method, config.grouping.lambda_2 = "ltdd+hierarchical", 0.0
  config.experts.num_experts, config.experts.epochs, config.distill.max_start_epoch = 1, 2, 1
  two_groups = grouping.Grouping(((0, 1, 2), tuple(range(3, 10))), 10)
  group_counts = np.array([data.counts[:3].sum(), data.counts[3:].sum()], np.float64)
  assert abs(group_counts[0] / group_counts.sum() - 0.5) > 0.05  # the groups are imbalanced
  for sampling, expected in (("class_balanced", [0.5, 0.5]),
                             ("instance", group_counts / group_counts.sum()),
                             ("by_class", [0.3, 0.7])):  # the groups' 3 and 7 classes
    config.grouping.stage1_sampling = sampling
    objectives = pipeline.hierarchical_objectives(_context(config, data, tmp_path), two_groups)
    assert [o.name for o in objectives] == ["groups"]
    np.testing.assert_allclose(objectives[0].student.class_weights, expected, rtol=1e-6)
    assert objectives[0].classifier_experts is None


def test_expert_decoupling_only_where_the_experts_drew_imbalanced_classes(tiny, tmp_path):
  config, data, _ = tiny
  config = config.copy_and_resolve_references()
  config.method = "ltdd+hierarchical"
  spec = lambda: specs.hierarchical_spec(config, specs.method(config))
  counts = np.array([500, 100, 50])
  assert hierarchical.decoupled(spec(), counts, "instance")  # 10x: ED as in flat LTDD
  assert not hierarchical.decoupled(spec(), counts[1:], "instance")  # 2x
  assert not hierarchical.decoupled(spec(), counts, "class_balanced")  # drawn balanced
  config.grouping.ed_min_imbalance = 1.0  # ED on every objective
  assert hierarchical.decoupled(spec(), counts, "class_balanced")
  config.experts.num_experts, config.experts.epochs, config.experts.classifier_epochs = 1, 2, 1
  config.distill.max_start_epoch = 1
  config.grouping.lambda_2 = 0.0
  two_groups = grouping.Grouping(((0, 1, 2), tuple(range(3, 10))), 10)
  objectives = pipeline.hierarchical_objectives(_context(config, data, tmp_path), two_groups)
  assert objectives[0].classifier_experts is not None
  config.method = "mtt+hierarchical"
  assert not hierarchical.decoupled(spec(), counts, "instance")


def test_by_class_group_experts_draw_every_class_equally(tiny, tmp_path, monkeypatch):
  config, data, _ = tiny
  config = config.copy_and_resolve_references()
  config.method, config.grouping.stage1_sampling = "mtt+hierarchical", "by_class"
  seen = {}
  def recording(recipe, labelling, images, labels, directory, mesh, init_params=None,
                strata=None):
    seen.update(recipe=recipe, labels=labels, strata=strata)
    raise StopIteration
  monkeypatch.setattr(experts, "train_experts", recording)
  two_groups = grouping.Grouping(((0, 1, 2), tuple(range(3, 10))), 10)
  try:
    pipeline.stage_group_experts(_context(config, data, tmp_path), two_groups)
  except StopIteration:
    pass
  spec = seen["recipe"].train
  assert spec.sampling == "class_balanced" and spec.num_strata == 10 and spec.num_classes == 2
  np.testing.assert_array_equal(seen["labels"], two_groups.group_of[data.train_labels])
  np.testing.assert_array_equal(seen["strata"], data.train_labels)
  draws = np.concatenate([np.asarray(training.epoch_indices(
      jax.random.key(k), jnp.asarray(seen["strata"]), spec)).ravel() for k in range(10)])
  np.testing.assert_allclose(np.bincount(data.train_labels[draws], minlength=10) / len(draws),
                             0.1, atol=0.02)
