import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ltdd_jax import errors, models
from ltdd_jax.methods import statistics

SPEC = models.ModelSpec(depth=2, width=4, norm="batch", conv_impl="xla")


def _network(num_classes=3, image=(8, 8, 1)):
  model = models.make_classifier(SPEC, num_classes)
  params = model.init(jax.random.key(0), jnp.zeros((1, *image)))["params"]
  return model, params


def _data(per_class=(7, 4, 2), seed=0):
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(len(per_class)), per_class)
  images = rng.normal(size=(len(labels), 8, 8, 1)) + labels[:, None, None, None]
  return images.astype(np.float32), labels


def _calibrated():
  """(model, params, images, their class statistics, the stored-statistics model, its
  batch_stats) of the tiny network and data."""
  model, params = _network()
  images, labels = _data()
  stats = statistics.class_statistics(model, params, images, labels, 3, batch_size=64)
  stored = models.with_stored_stats(model)
  return model, params, images, stats, stored, stats.batch_stats(stored, (8, 8, 1))


def _conv_inputs(model, params, images):
  """The two batch norms' inputs (Conv_0 and Conv_1 outputs) of one training-mode pass."""
  _, state = model.apply({"params": params}, images, capture_intermediates=True)
  backbone = state["intermediates"]["backbone"]
  return [np.asarray(backbone[f"Conv_{i}"]["__call__"][0], np.float64) for i in range(2)]


def test_recalibrated_statistics_are_the_exact_class_statistics():
  model, params = _network()
  images, labels = _data()
  # One batch holds every image: each class's statistics are those of its images' layer inputs.
  stats = statistics.class_statistics(model, params, images, labels, 3, batch_size=64)
  assert len(stats.means) == 2
  chex.assert_shape(stats.means[0], (3, 4))
  inputs = _conv_inputs(model, params, images)
  for c in range(3):
    for layer, x in enumerate(inputs):
      np.testing.assert_allclose(stats.means[layer][c], x[labels == c].mean((0, 1, 2)), atol=1e-5)
      np.testing.assert_allclose(stats.variances[layer][c], x[labels == c].var((0, 1, 2)),
                                 atol=1e-5)
  # Several batches (the last one filled up from the start): the first layer's input does not
  # depend on the batch, and the accumulated moments are still exact, every image counted once.
  split = statistics.class_statistics(model, params, images, labels, 3, batch_size=5)
  np.testing.assert_array_equal(split.counts, [7, 4, 2])
  for c in range(3):
    x = inputs[0][labels == c]
    np.testing.assert_allclose(split.means[0][c], x.mean((0, 1, 2)), atol=1e-5)
    np.testing.assert_allclose(split.variances[0][c], x.var((0, 1, 2)), atol=1e-5)


def test_balanced_target_is_the_uniform_class_average():
  model, params = _network()
  images, labels = _data(per_class=(9, 3, 1))
  stats = statistics.class_statistics(model, params, images, labels, 3, batch_size=64)
  means, variances = stats.balanced()
  for layer in range(2):
    np.testing.assert_allclose(means[layer], stats.means[layer].mean(0), rtol=1e-6)
    np.testing.assert_allclose(variances[layer], stats.variances[layer].mean(0), rtol=1e-6)
  # Not the count-weighted average the head class would dominate.
  weighted = (stats.counts[:, None] * stats.means[0]).sum(0) / stats.counts.sum()
  assert not np.allclose(means[0], weighted, atol=1e-3)


def test_stored_statistics_normalise_every_batch_the_same_way():
  model, params, images, stats, stored, batch_stats = _calibrated()
  apply = lambda x: stored.apply({"params": params, "batch_stats": batch_stats}, x)
  # With stored statistics an image's logits do not depend on the rest of its batch.
  np.testing.assert_allclose(apply(images)[:3], apply(images[:3]), rtol=1e-5, atol=1e-5)
  moments = statistics.image_moments(stored, params, jnp.asarray(images), batch_stats)
  chex.assert_shape([m for pair in moments for m in pair], [(len(images), 4)] * 4)
  with pytest.raises(errors.InputError, match="model.norm='batch'"):
    models.with_stored_stats(models.make_classifier(models.ModelSpec(depth=2, width=4), 3))


def test_group_moments_give_each_groups_mean_and_variance():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(6, 5, 5, 2))
  first, second = x.mean((1, 2)), np.square(x).mean((1, 2))
  groups = np.array([0, 1, 0, 1, 1, 0])
  mean, var = statistics.group_moments(jnp.asarray(first), jnp.asarray(second),
                                       jnp.asarray(groups), 3)
  for g in (0, 1):
    np.testing.assert_allclose(mean[g], x[groups == g].mean((0, 1, 2)), atol=1e-6)
    np.testing.assert_allclose(var[g], x[groups == g].var((0, 1, 2)), atol=1e-6)
  np.testing.assert_array_equal(mean[2], 0.0)


def test_statistics_loss_falls_and_moves_only_the_pixels():
  model, params, images, stats, stored, batch_stats = _calibrated()
  syn_labels = jnp.array([0, 1, 2])
  syn = jnp.asarray(np.random.default_rng(2).normal(size=(3, 8, 8, 1)), jnp.float32)
  before = jax.tree.map(np.asarray, params)

  def loss(pixels):
    return statistics.statistics_loss(
        statistics.image_moments(stored, params, pixels, batch_stats), syn_labels, stats)

  tx = optax.adam(0.05)
  state = tx.init(syn)
  step = jax.jit(jax.value_and_grad(loss))
  first, grads = step(syn)
  assert float(jnp.abs(grads).sum()) > 0
  for _ in range(30):
    value, grads = step(syn)
    updates, state = tx.update(grads, state)
    syn = optax.apply_updates(syn, updates)
  assert float(loss(syn)) < 0.5 * float(first)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, params), before)


def test_a_class_without_images_is_an_error():
  model, params = _network()
  images, labels = _data()
  with pytest.raises(errors.InputError, match=r"Classes \[3\] have no images"):
    statistics.class_statistics(model, params, images, labels, 4, batch_size=8)


def test_group_statistics_average_their_classes_uniformly():
  model, params = _network()
  images, labels = _data(per_class=(9, 3, 1))
  stats = statistics.class_statistics(model, params, images, labels, 3, batch_size=64)
  groups = stats.grouped(np.array([0, 1, 1]))
  assert groups.num_classes == 2
  np.testing.assert_array_equal(groups.counts, [9, 4])
  for layer in range(2):
    np.testing.assert_allclose(groups.means[layer][0], stats.means[layer][0], rtol=1e-6)
    np.testing.assert_allclose(groups.means[layer][1], stats.means[layer][1:].mean(0), rtol=1e-6)
    np.testing.assert_allclose(groups.variances[layer][1], stats.variances[layer][1:].mean(0),
                               rtol=1e-6)
