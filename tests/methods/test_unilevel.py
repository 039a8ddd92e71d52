import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ltdd_jax import errors, models
from ltdd_jax.methods import statistics, unilevel


def test_resized_crop_of_the_whole_image_is_the_image():
  image = jnp.asarray(np.random.default_rng(0).normal(size=(8, 8, 3)), jnp.float32)
  np.testing.assert_allclose(unilevel.resized_crop(image, 0.0, 0.0, 1.0), image, atol=1e-5)
  corner = unilevel.resized_crop(image, 0.0, 0.0, 0.5)  # the top-left quarter, upsampled x2
  np.testing.assert_allclose(corner[::2, ::2].mean(), image[:4, :4].mean(), atol=0.3)
  views = unilevel.random_views(jax.random.key(0), jnp.stack([image] * 5), 0.5)
  chex.assert_shape(views, (5, 8, 8, 3))


def test_crops_are_chosen_in_rounds_of_each_images_best():
  scores = np.array([[0.9, 0.1, 0.5], [0.8, 0.7, 0.2]])
  assert unilevel.select_crops(scores, 1) == [(0, 0)]
  assert unilevel.select_crops(scores, 2) == [(0, 0), (1, 0)]
  # Fewer images than slots: a second round takes each image's second-best crop.
  assert unilevel.select_crops(scores, 3) == [(0, 0), (1, 0), (1, 1)]
  with pytest.raises(errors.InputError, match="raise unilevel.crops"):
    unilevel.select_crops(scores, 7)


def _calibrated(counts):
  """A batch-norm ConvNet on [sum(counts), 8, 8, 1] images of len(counts) classes: (params,
  images, labels, its class statistics, the stored-statistics teacher, the observer moments)."""
  spec = models.ModelSpec(depth=2, width=4, norm="batch", conv_impl="xla")
  model = models.make_classifier(spec, len(counts))
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
  labels = np.repeat(np.arange(len(counts)), counts)
  images = (np.random.default_rng(0).normal(size=(len(labels), 8, 8, 1))
            + labels[:, None, None, None]).astype(np.float32)
  targets = statistics.class_statistics(model, params, images, labels, len(counts), batch_size=64)
  stored = models.with_stored_stats(model)
  batch_stats = targets.batch_stats(stored, (8, 8, 1))
  teacher = lambda x: stored.apply({"params": params, "batch_stats": batch_stats}, x)
  moments = lambda x: statistics.image_moments(stored, params, x, batch_stats)
  return params, images, labels, targets, teacher, moments


def test_synthesis_moves_the_pixels_and_leaves_the_networks_alone():
  params, images, labels, targets, teacher, moments = _calibrated((5, 5, 5))
  synthesis = unilevel.SynthesisSpec(ipc=2, iterations=20, crops=2)
  start, syn_labels = unilevel.initial_images(synthesis, teacher, images, labels, 3)
  chex.assert_shape(start, (6, 8, 8, 1))
  np.testing.assert_array_equal(syn_labels, [0, 0, 1, 1, 2, 2])
  before = jax.tree.map(np.asarray, params)
  step = unilevel.synthesis_step(synthesis, teacher, moments, targets)
  pixels, opt_state = jnp.asarray(start), unilevel.optimizer(synthesis).init(jnp.asarray(start))
  losses = []
  for i in range(synthesis.iterations):
    pixels, opt_state, loss = step(pixels, opt_state, jax.random.key(i), jnp.asarray(syn_labels))
    losses.append(float(loss))
  assert np.mean(losses[-5:]) < np.mean(losses[:5])
  assert float(jnp.abs(pixels - start).max()) > 0
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, params), before)


def test_the_group_and_within_group_cross_entropies_add_up_to_the_flat_one():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(6, 5)), jnp.float32)
  labels = jnp.asarray([0, 1, 2, 3, 4, 2])
  group_of = (0, 0, 1, 1, 1)
  by_group = unilevel.group_logits(logits, group_of, 2)
  chex.assert_shape(by_group, (6, 2))
  probs = jax.nn.softmax(logits)
  np.testing.assert_allclose(jax.nn.softmax(by_group)[:, 0], probs[:, :2].sum(-1), rtol=1e-5)
  group_ce, within_ce = unilevel.split_cross_entropy(logits, labels, group_of, 2)
  flat = -jnp.log(probs[jnp.arange(6), labels]).mean()
  np.testing.assert_allclose(group_ce + within_ce, flat, rtol=1e-5)
  assert float(group_ce) > 0 and float(within_ce) > 0


def _synthesis_problem():
  _, images, labels, targets, teacher, moments = _calibrated((8, 5, 3, 2))
  return teacher, moments, targets, jnp.asarray(images[::2]), jnp.asarray(labels[::2])


def test_hierarchical_synthesis_loss_is_the_flat_one_plus_the_group_stage():
  teacher, moments, targets, views, labels = _synthesis_problem()
  spec = unilevel.SynthesisSpec(ipc=1)
  flat = unilevel.synthesis_loss(spec, teacher, moments, targets, views, labels)
  # One group: no stage 1, and the within-group cross-entropy is the flat one.
  one = unilevel.GroupedSynthesis((0, 0, 0, 0))
  assert not one.stage1
  np.testing.assert_allclose(
      unilevel.synthesis_loss(spec, teacher, moments, targets, views, labels, one), flat,
      rtol=1e-5)
  # Two groups, lambda_1 = lambda_2 = 1: the cross-entropies add up to the flat one, so the loss
  # is the flat one plus the group-wise statistics distance from the groups' balanced targets.
  two = unilevel.GroupedSynthesis((0, 0, 1, 1))
  group_targets = targets.grouped(np.asarray(two.group_of))
  loss = unilevel.synthesis_loss(spec, teacher, moments, targets, views, labels, two)
  moments_of = moments(views)
  weights = [spec.first_multiplier] + [1.0] * (len(moments_of) - 1)
  group_term = sum(w * d for w, d in zip(weights, statistics.groupwise_distances(
      moments_of, jnp.asarray(two.group_of)[labels], group_targets)))
  np.testing.assert_allclose(loss, flat + spec.statistics_weight * group_term, rtol=1e-5)
  assert float(group_term) > 0
  # lambda_1 = 0 drops stage 1 (the group cross-entropy with it); lambda_2 scales the rest.
  half = unilevel.GroupedSynthesis((0, 0, 1, 1), lambda_1=0.0, lambda_2=0.5)
  group_ce, _ = unilevel.split_cross_entropy(teacher(views), labels, two.group_of, 2)
  np.testing.assert_allclose(
      unilevel.synthesis_loss(spec, teacher, moments, targets, views, labels, half),
      0.5 * (flat - group_ce), rtol=1e-5)
