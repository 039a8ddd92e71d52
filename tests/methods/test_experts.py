import chex
import jax
import numpy as np
import pytest

from conftest import train_flat_experts
from ltdd_jax import checkpoints, models, parallel, reporting
from ltdd_jax.core import ensemble
from ltdd_jax.methods import experts
from ltdd_jax.run import specs


def test_trajectory_shape_epoch_zero_and_final_layout(tiny):
  config, data, expert_set = tiny
  assert (expert_set.num_experts, expert_set.epochs) == (2, 4)
  trajectory = expert_set.load(1)
  init = ensemble.init_params(expert_set.model, jax.random.key(config.seed), 2, data.image_shape)
  chex.assert_trees_all_equal_shapes(
      trajectory, jax.tree.map(lambda x: np.zeros((5, *x.shape[1:])), init))
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], trajectory),
                              jax.tree.map(lambda x: x[1], init))
  moved = jax.tree.leaves(jax.tree.map(lambda x: np.abs(x[-1] - x[0]).max(), trajectory))
  assert max(moved) > 0
  # Written once, in the final layout: one tree per (expert, epoch), no ensemble checkpoints left.
  folders = sorted(p.name for p in expert_set.directory.iterdir())
  assert folders == ["meta.json", "trajectories"]
  assert len(list((expert_set.directory / "trajectories").glob("expert_*/epoch_*"))) == 2 * 5


def _train(config, data, directory, mesh, num_experts=None):
  config = config.copy_and_resolve_references()
  if num_experts:
    config.experts.num_experts = num_experts
  return train_flat_experts(config, data, directory, mesh)


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
  assert (tmp_path / "crashy" / "state").is_dir()
  monkeypatch.setattr(reporting.Progress, "update", original)
  resumed = _train(config, data, tmp_path / "crashy", parallel.make_mesh(1))
  for k in range(2):
    chex.assert_trees_all_equal(resumed.load(k), expert_set.load(k))
  assert not (tmp_path / "crashy" / "state").exists()


def test_four_devices_equal_one(tiny, tmp_path):
  config, data, _ = tiny
  config = config.copy_and_resolve_references()
  config.experts.epochs = 2
  four = _train(config, data, tmp_path / "four", parallel.make_mesh(4), num_experts=4)
  one = _train(config, data, tmp_path / "one", parallel.make_mesh(1), num_experts=4)
  chex.assert_trees_all_close(four.at_epoch(), one.at_epoch(), rtol=1e-5, atol=1e-6)


def test_classifier_only_leaves_backbone_unchanged(tiny):
  config, data, expert_set = tiny
  cls = experts.train_classifier_experts(specs.expert_spec(config), expert_set, data.train_images,
                                         data.train_labels, parallel.make_mesh(1))
  assert cls.directory == experts.classifier_directory(expert_set)
  trajectory = cls.load(0)
  assert jax.tree.leaves(trajectory)[0].shape[0] == config.experts.classifier_epochs + 1
  for leaf in jax.tree.leaves(trajectory["backbone"]):
    np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))
  chex.assert_trees_all_equal(jax.tree.map(lambda x: x[0], trajectory["backbone"]),
                              jax.tree.map(lambda x: x[-1], expert_set.load(0)["backbone"]))
  assert np.abs(trajectory["head"]["kernel"][-1] - trajectory["head"]["kernel"][0]).max() > 0


def test_labelling_subsets_relabel_or_map():
  images = np.arange(6)[:, None]
  labels = np.array([0, 1, 2, 1, 2, 0])
  x, y = experts.Labelling(2, classes=(2, 0)).apply(images, labels)
  np.testing.assert_array_equal(x[:, 0], [0, 2, 4, 5])
  np.testing.assert_array_equal(y, [1, 0, 0, 1])
  x, y = experts.Labelling(2, label_map=(0, 1, 1)).apply(images, labels)
  np.testing.assert_array_equal(y, [0, 1, 1, 1, 1, 0])
  with pytest.raises(ValueError, match="either a class subset or a label map"):
    experts.Labelling(2, classes=(0, 1), label_map=(0, 1, 1))


def test_missing_expert_set_message(tmp_path):
  model = models.make_classifier(models.ModelSpec(depth=1, width=4), 10)
  with pytest.raises(FileNotFoundError, match="Train the experts first"):
    experts.ExpertSet.open(tmp_path, model)


def test_class_balanced_epoch_counts_largest_class_times_classes(tiny):
  """LTDD's class-aware sampler: one class-balanced epoch draws max_c n_c x C images."""
  config, _, _ = tiny
  config = config.copy_and_resolve_references()
  config.experts.batch_size = 10
  spec = specs.expert_spec(config)
  labels = np.array([0] * 90 + [1] * 10 + [2] * 5)
  assert experts.train_spec(spec, labels, 3, head_only=True).steps_per_epoch == 27  # 90 x 3 / 10
  assert experts.train_spec(spec, labels, 3).steps_per_epoch == 11  # instance: ceil(105 / 10)
  config.experts.balanced_epoch = "dataset"
  dataset_epoch = specs.expert_spec(config)
  assert experts.train_spec(dataset_epoch, labels, 3, head_only=True).steps_per_epoch == 11
  config.experts.balanced_epoch = "largest"
  with pytest.raises(ValueError, match="experts.balanced_epoch 'largest'"):
    experts.train_spec(specs.expert_spec(config), labels, 3, head_only=True)


def test_one_way_to_run_experts_on_images(tiny):
  """ExpertSet.logits / features: every expert at an epoch, or the chosen ones, in batches."""
  _, data, expert_set = tiny
  images = data.test_images[:25]
  every = expert_set.logits(images, batch_size=10)
  chex.assert_shape(every, (2, 25, 10))
  np.testing.assert_allclose(expert_set.logits(images, experts=(1,), batch_size=7)[0], every[1],
                             rtol=1e-5, atol=1e-5)
  first = expert_set.logits(images, epoch=0)
  assert not np.allclose(first, every)
  features = expert_set.features(images, expert=1, batch_size=10)
  assert features.shape[0] == 25 and features.ndim == 2


def test_reader_reads_only_sampled_epochs_with_a_bounded_cache(tiny, monkeypatch):
  """Distillation's expert reader loads one (expert, epoch) at a time and keeps a few."""
  _, _, expert_set = tiny
  reads = []
  original = checkpoints.load_tree
  monkeypatch.setattr(checkpoints, "load_tree", lambda p: reads.append(p) or original(p))
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
