import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ltdd_jax import models, parallel
from ltdd_jax.core import augment, ensemble, matching, training

DSA = augment.DSASpec(strategy="color_scale")


def _setup(dtype=jnp.float32, width=2, size=4, n=6):
  model = models.make_classifier(models.ModelSpec(depth=1, width=width), 3)
  apply_fn = ensemble.make_apply(model)
  start = jax.tree.map(lambda x: x.astype(dtype), model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 1)))["params"])
  target = jax.tree.map(lambda x: x + 0.05 * jnp.ones_like(x), start)
  images = jax.random.normal(jax.random.key(1), (n, size, size, 1), dtype)
  labels = jnp.arange(n) % 3
  return apply_fn, start, target, images, labels


def _spec(syn_steps, batch_syn, dsa=True, **kw):
  return matching.InnerSpec(syn_steps, batch_syn, augment=DSA if dsa else None, **kw)


def _loss(apply_fn, spec, images, targets, lr, start, target, key, part="all", mesh=None):
  student = matching.Student(apply_fn, spec, mesh=mesh)
  return matching.trajectory_matching_loss(
      student, {"images": images, "targets": targets, "lr": lr}, {"start": start, "target": target},
      key, part)


def _unroll(apply_fn, spec, start, images, targets, lr, key):
  """The student's unroll, compiled once (the tests' programs are small: compiling dominates)."""
  unroll = jax.jit(lambda p, x, t, l, k: matching.unroll_student(
      matching.Student(apply_fn, spec), p, {"images": x, "targets": t, "lr": l}, k))
  return unroll(start, images, targets, lr, key)


def test_image_gradient_matches_finite_differences():
  with jax.enable_x64(True):
    apply_fn, start, target, images, labels = _setup(jnp.float64)
    spec = _spec(3, 4)
    f = jax.jit(lambda x: _loss(apply_fn, spec, x, labels, jnp.float64(0.1), start, target,
                                jax.random.key(3)))
    grad = jax.jit(jax.grad(f))(images)
    assert np.abs(np.asarray(grad)).max() > 0
    for seed in range(3):
      d = jax.random.normal(jax.random.key(10 + seed), images.shape, jnp.float64)
      eps = 1e-5
      numeric = (f(images + eps * d) - f(images - eps * d)) / (2 * eps)
      np.testing.assert_allclose(jnp.vdot(grad, d), numeric, rtol=1e-5, atol=1e-9)


def test_remat_gives_the_same_gradients():
  apply_fn, start, target, images, labels = _setup()
  grads = {}
  for remat in (True, False):
    spec = _spec(4, 3, remat=remat)
    grads[remat] = jax.jit(jax.grad(lambda x, lr: _loss(
        apply_fn, spec, x, labels, lr, start, target, jax.random.key(3)),
        argnums=(0, 1)))(images, jnp.float32(0.1))
  for a, b in zip(grads[True], grads[False]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_zero_lr_student_stays_at_start():
  apply_fn, start, target, images, labels = _setup()
  loss = _loss(apply_fn, _spec(2, 3), images, labels, jnp.float32(0.0), start, target,
               jax.random.key(0))
  np.testing.assert_allclose(loss, 1.0, rtol=1e-6)


def test_soft_label_gradient_and_parts():
  apply_fn, start, target, images, _ = _setup()
  logits = jax.random.normal(jax.random.key(4), (images.shape[0], 3))
  spec = _spec(2, 3, dsa=False)
  for part in ("all", "backbone", "head"):
    g = jax.jit(jax.grad(lambda l: _loss(
        apply_fn, spec, images, matching.soft_targets(l), jnp.float32(0.1), start,
        target, jax.random.key(0), part=part)))(logits)
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0


def test_four_devices_equal_one():
  apply_fn, start, target, images, labels = _setup(n=8)
  spec = _spec(3, 4)
  results = []
  for n in (1, 4):
    mesh = parallel.make_mesh(n)
    fn = jax.jit(jax.value_and_grad(lambda x: _loss(
        apply_fn, spec, x, labels, jnp.float32(0.1), start, target, jax.random.key(2),
        mesh=mesh)))
    results.append(parallel.gather(fn(parallel.replicate(images, mesh))))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
  np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-4, atol=1e-7)


def test_minibatches_cover_permutations():
  spec = matching.InnerSpec(syn_steps=5, batch_syn=4)
  idx = np.asarray(matching.minibatch_indices(jax.random.key(0), 8, spec))
  assert idx.shape == (5, 4)
  assert sorted(idx[:2].ravel()) == list(range(8))


def test_dam_weights_and_bad_policy():
  w = matching.class_frequency_weights(np.array([100, 10, 10]))
  np.testing.assert_allclose(w, [100 / 120, 10 / 120, 10 / 120], rtol=1e-6)  # n_c / N
  counts = np.array([100, 10, 10])
  np.testing.assert_array_equal(matching.sampled_class_counts(counts, "instance"), counts)
  np.testing.assert_array_equal(matching.sampled_class_counts(counts, "class_balanced"), [1, 1, 1])
  with pytest.raises(ValueError, match="expert sampling"):
    matching.sampled_class_counts(counts, "balanced")
  with pytest.raises(ValueError, match="remat_policy"):
    matching.InnerSpec(syn_steps=1, batch_syn=1, remat_policy="all")
  with pytest.raises(ValueError, match="dam_reduction"):
    matching.InnerSpec(syn_steps=1, batch_syn=1, weight_reduction="mean")


def test_weighted_cross_entropy_is_summed_over_the_batch():
  """LTDD's DAM loss: sum_i sum_c w_c t_ic (-log p_ic) / batch; `weighted_mean` divides by the
  summed target weights instead."""
  logits = jax.random.normal(jax.random.key(0), (5, 3))
  targets = jax.nn.softmax(jax.random.normal(jax.random.key(1), (5, 3)))
  w = jnp.asarray([0.7, 0.2, 0.1])
  terms = -(targets * w * jax.nn.log_softmax(logits))
  np.testing.assert_allclose(training.cross_entropy(logits, targets, w), terms.sum() / 5,
                             rtol=1e-6)
  np.testing.assert_allclose(training.cross_entropy(logits, targets, w, "weighted_mean"),
                             terms.sum() / (targets * w).sum(), rtol=1e-6)
  hard = jnp.asarray([0, 2, 1, 0, 0])
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), hard[:, None], 1)[:, 0]
  np.testing.assert_allclose(training.cross_entropy(logits, hard, w), (w[hard] * nll).sum() / 5,
                             rtol=1e-6)
  np.testing.assert_allclose(training.cross_entropy(logits, hard), nll.mean(), rtol=1e-6)


def test_head_only_unroll_leaves_backbone_bitwise_unchanged():
  """LTDD's classifier stage: the student trains its head alone, its backbone stays the expert's."""
  apply_fn, start, _, images, labels = _setup()
  final = _unroll(apply_fn, _spec(3, 4, train_part="head"), start, images, labels,
                  jnp.float32(0.5), jax.random.key(0))
  for a, b in zip(jax.tree.leaves(final["backbone"]), jax.tree.leaves(start["backbone"])):
    np.testing.assert_array_equal(a, b)
  assert np.abs(final["head"]["kernel"] - start["head"]["kernel"]).max() > 0
  every = _unroll(apply_fn, _spec(3, 4), start, images, labels, jnp.float32(0.5),
                  jax.random.key(0))
  assert np.abs(every["backbone"]["Conv_0"]["kernel"] - start["backbone"]["Conv_0"]["kernel"]).max() > 0
  # The images still get a meta-gradient through the frozen backbone's forward pass.
  g = jax.jit(jax.grad(lambda x: _loss(
      apply_fn, _spec(3, 4, train_part="head"), x, labels, jnp.float32(0.5), start,
      jax.tree.map(lambda v: v + 0.05, start), jax.random.key(0), part="head")))(images)
  assert np.abs(np.asarray(g)).max() > 0


def test_distill_dsa_switch_turns_augmentation_off_in_the_unroll():
  """distill.dsa is the distillation's own switch: off, the student sees the images as they are."""
  apply_fn, start, _, images, labels = _setup()
  run = lambda spec: _unroll(apply_fn, spec, start, images, labels, jnp.float32(0.5),
                             jax.random.key(0))
  off = run(_spec(2, 4, dsa=False))
  plain = run(matching.InnerSpec(2, 4, augment=augment.DSASpec(strategy="")))
  augmented = run(_spec(2, 4))
  for a, b in zip(jax.tree.leaves(off), jax.tree.leaves(plain)):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(off),
                                                      jax.tree.leaves(augmented)))
