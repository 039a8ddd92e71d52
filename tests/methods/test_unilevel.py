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


def test_synthesis_moves_the_pixels_and_leaves_the_networks_alone():
  spec = models.ModelSpec(depth=2, width=4, norm="batch", conv_impl="xla")
  model = models.make_classifier(spec, 3)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(3), 5)
  images = (rng.normal(size=(15, 8, 8, 1)) + labels[:, None, None, None]).astype(np.float32)
  targets = statistics.class_statistics(model, params, images, labels, 3, batch_size=64)
  stored = models.with_stored_stats(model)
  batch_stats = targets.batch_stats(stored, (8, 8, 1))
  teacher = lambda x: stored.apply({"params": params, "batch_stats": batch_stats}, x)
  moments = lambda x: statistics.image_moments(stored, params, x, batch_stats)
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
