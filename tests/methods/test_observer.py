import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ltdd_jax import errors
from ltdd_jax.methods import observer


def test_debias_weights_follow_n_to_the_minus_q():
  counts = np.array([5000, 500, 50])
  weights = observer.debias_weights(counts, q=0.8)
  np.testing.assert_allclose(weights.mean(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(weights[1] / weights[0], 10 ** 0.8, rtol=1e-5)
  np.testing.assert_allclose(weights[2] / weights[1], 10 ** 0.8, rtol=1e-5)
  np.testing.assert_allclose(observer.debias_weights(counts, 0.8, "sum").sum(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(observer.debias_weights(counts, 0.0), [1, 1, 1])
  with pytest.raises(errors.InputError, match="counts"):
    observer.debias_weights(np.array([3, 0]), 0.8)


def test_alpha_schedule_and_the_blend_of_the_two_terms():
  np.testing.assert_allclose([observer.debias_alpha(t, 10) for t in (0, 5, 10)], [0, 0.25, 1])
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
  targets = jax.nn.one_hot(jnp.array([0, 1, 2, 0, 1, 2]), 3)
  weights = jnp.array([0.5, 1.0, 1.5])
  log_p = jax.nn.log_softmax(logits)
  plain = -(targets * log_p).sum(-1).mean()
  reweighted = -(targets * weights * log_p).sum(-1).mean()
  np.testing.assert_allclose(observer.debias_loss(logits, targets, weights, 0.0), plain, rtol=1e-6)
  np.testing.assert_allclose(observer.debias_loss(logits, targets, weights, 1.0), reweighted,
                             rtol=1e-6)
  np.testing.assert_allclose(observer.debias_loss(logits, targets, weights, 0.25),
                             0.25 * reweighted + 0.75 * plain, rtol=1e-6)


def test_consistency_moves_the_predictions_not_the_projections():
  rng = np.random.default_rng(1)
  z1, z2, p1, p2 = (jnp.asarray(rng.normal(size=(4, 5)), jnp.float32) for _ in range(4))
  loss = lambda z1, z2, p1, p2: observer.consistency_loss((z1, z2), (p1, p2))
  grads = jax.grad(loss, argnums=(0, 1, 2, 3))(z1, z2, p1, p2)
  assert float(jnp.abs(grads[0]).sum()) == 0 and float(jnp.abs(grads[1]).sum()) == 0
  assert float(jnp.abs(grads[2]).sum()) > 0 and float(jnp.abs(grads[3]).sum()) > 0
  np.testing.assert_allclose(loss(z1, z2, z2, z1), -2.0, rtol=1e-6)  # aligned views: the minimum


def test_mixed_views_mix_their_targets_by_the_share_they_took():
  key = jax.random.key(3)
  images = jnp.zeros((2, 8, 8, 1))
  partner = jnp.ones((2, 8, 8, 1))
  targets, partner_targets = jax.nn.one_hot(jnp.array([0, 1]), 3), jax.nn.one_hot(jnp.array([2, 2]), 3)
  (mixup, mixup_t), (cutmix, cutmix_t) = observer.mix_views(key, images, targets, partner,
                                                            partner_targets)
  lam = 1.0 - float(mixup[0, 0, 0, 0])  # mixup of 0 and 1 images is 1 - lam everywhere
  np.testing.assert_allclose(mixup_t[:, 2], 1.0 - lam, rtol=1e-5)
  np.testing.assert_allclose(cutmix_t[:, 2], cutmix.mean((1, 2, 3)), rtol=1e-5)
  np.testing.assert_allclose(mixup_t.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(cutmix_t.sum(-1), 1.0, rtol=1e-6)


def test_observer_kernel_trains_through_the_one_ensemble_trainer(tiny):
  from ltdd_jax import models, parallel, seeds  # pylint: disable=g-import-not-at-top
  from ltdd_jax.core import ensemble, training  # pylint: disable=g-import-not-at-top
  _, data, _ = tiny
  spec = models.ModelSpec(depth=2, width=8, norm="batch")
  net = observer.ObserverNet(models.make_backbone(spec), 10, 16)
  train = training.TrainSpec(batch_size=128, steps_per_epoch=8, momentum=0.9, weight_decay=5e-4,
                             num_classes=10)
  recipe = ensemble.Recipe(net, train, 0.05, 3, 2, init_seed=0, keys=seeds.EpochKeys(1),
                           kernel=observer.ObserverKernel(epochs=3))
  def diverged(done, losses):
    return AssertionError(f"diverged at {done}: {losses}")
  params = ensemble.train(recipe, ensemble.init_states(recipe, data.image_shape),
                          {"images": data.train_images, "targets": data.train_labels,
                           "labels": data.train_labels}, parallel.make_mesh(1),
                          diverged=diverged)["params"]
  assert sorted(params) == ["backbone", "head", "predictor", "projector"]
  logits = ensemble.logits(observer.as_classifier(net, spec), params, data.test_images)
  accuracy = (logits.argmax(-1) == data.test_labels[None]).mean(-1)
  assert logits.shape == (2, len(data.test_labels), 10) and (accuracy > 0.3).all(), accuracy
