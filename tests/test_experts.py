import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ltdd_jax import experts, models, parallel, reporting, training


def test_trajectory_shape_and_epoch_zero(tiny):
  config, data, expert_set = tiny
  assert (expert_set.num_experts, expert_set.epochs) == (2, 4)
  trajectory = expert_set.load(1)
  model = models.make_classifier(config.model, data.num_classes)
  init = training.init_ensemble(model, jax.random.key(config.seed), 2, data.image_shape)
  chex.assert_trees_all_equal_shapes(
      trajectory, jax.tree.map(lambda x: np.zeros((5, *x.shape[1:])), init))
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], trajectory),
                              jax.tree.map(lambda x: x[1], init))
  stacked = expert_set.load_all()
  assert jax.tree.leaves(stacked)[0].shape[:2] == (2, 5)
  moved = jax.tree.leaves(jax.tree.map(lambda x: np.abs(x[-1] - x[0]).max(), trajectory))
  assert max(moved) > 0


def _train(config, data, directory, mesh, num_experts=None):
  config = config.copy_and_resolve_references()
  if num_experts:
    config.experts.num_experts = num_experts
  return experts.train_experts(config, data, directory, mesh)


def test_vmapped_single_expert_equals_plain_training(tiny, tmp_path):
  config, data, _ = tiny
  ensemble = _train(config, data, tmp_path / "one", parallel.make_mesh(1), num_experts=1)
  model = models.make_classifier(config.model, data.num_classes)
  params = jax.tree.map(lambda x: x[0], training.init_ensemble(
      model, jax.random.key(config.seed), 1, data.image_shape))
  velocity = jax.tree.map(jnp.zeros_like, params)
  spec = experts.expert_spec(config.experts, data.train_labels, data.num_classes)
  epoch = jax.jit(lambda p, v, k: training.train_epoch(
      training.make_apply(model), spec, config.dsa, p, v, k, jnp.float32(config.experts.lr),
      data.train_images, data.train_labels, data.train_labels, data.num_classes))
  for e in range(1, config.experts.epochs + 1):
    key = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), e), 1)[0]
    params, velocity, _ = epoch(params, velocity, key)
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[-1], ensemble.load(0)), params,
                              rtol=1e-5, atol=1e-6)


def test_resume_after_crash_matches_uninterrupted(tiny, tmp_path, monkeypatch):
  config, data, expert_set = tiny
  original = reporting.Progress.update

  def crash_at_epoch_2(self, done, extra="", force=False):
    original(self, done, extra, force)
    if done == 2:
      raise KeyboardInterrupt("simulated crash")

  monkeypatch.setattr(reporting.Progress, "update", crash_at_epoch_2)
  with pytest.raises(KeyboardInterrupt):
    _train(config, data, tmp_path / "crashy", parallel.make_mesh(1))
  assert not (tmp_path / "crashy" / "meta.json").exists()
  monkeypatch.setattr(reporting.Progress, "update", original)
  resumed = _train(config, data, tmp_path / "crashy", parallel.make_mesh(1))
  for k in range(2):
    chex.assert_trees_all_equal(resumed.load(k), expert_set.load(k))


def test_four_devices_equal_one(tiny, tmp_path):
  config, data, _ = tiny
  config = config.copy_and_resolve_references()
  config.experts.epochs = 2
  four = _train(config, data, tmp_path / "four", parallel.make_mesh(4), num_experts=4)
  one = _train(config, data, tmp_path / "one", parallel.make_mesh(1), num_experts=4)
  chex.assert_trees_all_close(four.load_all(), one.load_all(), rtol=1e-5, atol=1e-6)


def test_classifier_only_leaves_backbone_unchanged(tiny):
  config, data, expert_set = tiny
  cls = experts.classifier_experts(config, data, expert_set, parallel.make_mesh(1))
  trajectory = cls.load(0)
  assert jax.tree.leaves(trajectory)[0].shape[0] == config.experts.classifier_epochs + 1
  for leaf in jax.tree.leaves(trajectory["backbone"]):
    np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))
  chex.assert_trees_all_equal(jax.tree.map(lambda x: x[0], trajectory["backbone"]),
                              jax.tree.map(lambda x: x[-1], expert_set.load(0)["backbone"]))
  assert np.abs(trajectory["head"]["kernel"][-1] - trajectory["head"]["kernel"][0]).max() > 0


def test_subset_relabels():
  images = np.arange(6)[:, None]
  labels = np.array([0, 1, 2, 1, 2, 0])
  x, y = experts.subset_classes(images, labels, (2, 0))
  np.testing.assert_array_equal(x[:, 0], [0, 2, 4, 5])
  np.testing.assert_array_equal(y, [1, 0, 0, 1])


def test_missing_expert_set_message(tmp_path):
  with pytest.raises(FileNotFoundError, match="Train the experts first"):
    experts.ExpertSet.open(tmp_path)


def test_balanced_sampling_is_balanced():
  labels = jnp.asarray(np.array([0] * 90 + [1] * 10))
  spec = training.TrainSpec(batch_size=100, steps_per_epoch=20, momentum=0, weight_decay=0,
                            sampling="class_balanced")
  idx = np.asarray(training.epoch_indices(jax.random.key(0), labels, spec, 2))
  share = (np.asarray(labels)[idx] == 1).mean()
  assert 0.45 < share < 0.55


def test_class_balanced_epoch_counts_largest_class_times_classes(tiny):
  """LTDD's class-aware sampler: one class-balanced epoch draws max_c n_c x C images."""
  config, _, _ = tiny
  cfg = config.experts.copy_and_resolve_references()
  cfg.batch_size = 10
  labels = np.array([0] * 90 + [1] * 10 + [2] * 5)
  assert experts.expert_spec(cfg, labels, 3, head_only=True).steps_per_epoch == 27  # 90 x 3 / 10
  assert experts.expert_spec(cfg, labels, 3).steps_per_epoch == 11  # instance: ceil(105 / 10)
  cfg.balanced_epoch = "dataset"
  assert experts.expert_spec(cfg, labels, 3, head_only=True).steps_per_epoch == 11
  cfg.balanced_epoch = "largest"
  with pytest.raises(ValueError, match="experts.balanced_epoch 'largest'"):
    experts.expert_spec(cfg, labels, 3, head_only=True)


def test_reader_reads_only_sampled_epochs_with_a_bounded_cache(tiny, monkeypatch):
  """Distillation's expert reader loads one (expert, epoch) at a time and keeps a few."""
  _, _, expert_set = tiny
  reads = []
  original = experts.checkpoints.load_tree
  monkeypatch.setattr(experts.checkpoints, "load_tree", lambda p: reads.append(p) or original(p))
  reader = experts.TrajectoryReader(expert_set, cache_size=2)
  chex.assert_trees_all_equal(reader.get(1, 3), jax.tree.map(lambda x: x[3], expert_set.load(1)))
  reads.clear()
  reader.get(1, 3)
  assert not reads, "a cached epoch is not read again"
  reader.get(0, 0), reader.get(0, 1)
  assert len(reads) == 2 and all("epoch_" in str(p) for p in reads)
  assert len(reader._cache) == 2  # bounded: (1, 3) was evicted
  reader.get(1, 3)
  assert len(reads) == 3
  with pytest.raises(IndexError, match="epoch 9"):
    expert_set.load_epoch(0, 9)
  stacked = experts.StackedTrajectories(expert_set.load_all())
  assert (stacked.num_experts, stacked.num_epochs) == (reader.num_experts, reader.num_epochs)
  chex.assert_trees_all_equal(stacked.get(1, 2), reader.get(1, 2))


def test_sets_in_the_earlier_stacked_layout_still_read(tiny, tmp_path):
  _, _, expert_set = tiny
  old = tmp_path / "old"
  for k in range(expert_set.num_experts):  # one tree per expert holding every epoch
    experts.checkpoints.save_tree(old / "trajectories" / f"expert_{k:03d}", expert_set.load(k))
  meta = json.loads((expert_set.directory / "meta.json").read_text())
  del meta["layout"]
  reporting.write_json(old / "meta.json", meta)
  legacy = experts.ExpertSet.open(old)
  assert legacy.layout == "stacked"
  chex.assert_trees_all_equal(legacy.load_epoch(1, 2), expert_set.load_epoch(1, 2))
  chex.assert_trees_all_equal(legacy.at_epoch(), expert_set.at_epoch())
