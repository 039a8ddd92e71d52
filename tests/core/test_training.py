import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ltdd_jax.core import training


def _spec(**kw):
  return training.TrainSpec(**{"batch_size": 4, "steps_per_epoch": 2, "momentum": 0.9,
                               "weight_decay": 5e-4, "num_classes": 3, **kw})


def _pytorch_sgd(params, velocity, grads, lr, momentum, weight_decay):
  """torch.optim.SGD's step (no dampening, no Nesterov): the reference the optax form must equal."""
  grads = jax.tree.map(lambda g, p: g + weight_decay * p, grads, params)
  velocity = jax.tree.map(lambda v, g: momentum * v + g, velocity, grads)
  return jax.tree.map(lambda p, v: p - lr * v, params, velocity), velocity


@pytest.mark.parametrize("momentum,weight_decay", [(0.9, 5e-4), (0.0, 0.0), (0.5, 5e-3)])
def test_optax_sgd_is_pytorch_sgd_bitwise(momentum, weight_decay):
  """training.sgd (optax) reproduces PyTorch's SGD bit for bit, with an lr that changes between
  steps, inside jit as the epoch kernel runs it."""
  spec = _spec(momentum=momentum, weight_decay=weight_decay)
  rng = np.random.default_rng(0)
  params = {"a": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
  grads = [jax.tree.map(lambda x, i=i: jnp.asarray(rng.normal(size=x.shape), jnp.float32) * (i + 1),
                        params) for i in range(4)]
  lrs = [0.1, 0.1, 0.01, 0.37]

  @jax.jit
  def optax_step(p, opt_state, g, lr):
    updates, opt_state = training.sgd(spec, lr).update(g, opt_state, p)
    return optax.apply_updates(p, updates), opt_state

  @jax.jit
  def torch_step(p, v, g, lr):
    return _pytorch_sgd(p, v, g, lr, momentum, weight_decay)

  p_optax, opt_state = params, training.init_state(spec, params)["opt_state"]
  p_torch, velocity = params, jax.tree.map(jnp.zeros_like, params)
  for g, lr in zip(grads, lrs):
    p_optax, opt_state = optax_step(p_optax, opt_state, g, jnp.float32(lr))
    p_torch, velocity = torch_step(p_torch, velocity, g, jnp.float32(lr))
  chex.assert_trees_all_equal(p_optax, p_torch)
  assert not np.array_equal(p_optax["a"], params["a"])


def test_head_only_state_and_epoch_leave_the_backbone_bitwise():
  spec = _spec(head_only=True, batch_size=6, steps_per_epoch=3)
  params = {"backbone": {"w": jnp.ones((4, 4))}, "head": {"w": jnp.full((4, 3), 0.1)}}
  state = training.init_state(spec, params)
  chex.assert_trees_all_equal_structs(state["opt_state"],
                                      training.sgd(spec, 0.0).init(params["head"]))
  apply_fn = lambda p, x: jnp.tanh(x.reshape(len(x), -1)[:, :4] @ p["backbone"]["w"]) @ p["head"]["w"]
  rng = np.random.default_rng(1)
  data = {"images": jnp.asarray(rng.normal(size=(12, 2, 2, 1)), jnp.float32),
          "targets": jnp.asarray(rng.integers(0, 3, 12), jnp.int32)}
  data["labels"] = data["targets"]
  new, loss = jax.jit(lambda s, k: training.train_epoch(apply_fn, spec, s, k, jnp.float32(0.1),
                                                        data))(state, jax.random.key(0))
  chex.assert_trees_all_equal(new["params"]["backbone"], params["backbone"])
  assert not np.array_equal(new["params"]["head"]["w"], params["head"]["w"])
  assert np.isfinite(float(loss))


def test_balanced_sampling_is_balanced():
  labels = jnp.asarray(np.array([0] * 90 + [1] * 10))
  spec = training.TrainSpec(batch_size=100, steps_per_epoch=20, momentum=0, weight_decay=0,
                            num_classes=2, sampling="class_balanced")
  idx = np.asarray(training.epoch_indices(jax.random.key(0), labels, spec))
  chex.assert_shape(idx, (20, 100))
  share = (np.asarray(labels)[idx] == 1).mean()
  assert 0.45 < share < 0.55


def test_unknown_sampling_and_loss_are_named():
  with pytest.raises(ValueError, match="Unknown sampling 'balanced'"):
    _spec(sampling="balanced")
  with pytest.raises(ValueError, match="Unknown loss 'focal'"):
    _spec(loss="focal")


def test_segmented_cross_entropy_sums_the_heads_and_skips_heads_without_targets():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(4, 2 + 3)), jnp.float32)
  group = jax.nn.one_hot(jnp.array([0, 0, 1, 1]), 2)
  within = jnp.zeros((4, 3)).at[:2].set(jax.nn.one_hot(jnp.array([1, 2]), 3))  # head 1: images 0-1
  targets = jnp.concatenate([group, within], -1)
  loss = training.segmented_cross_entropy(logits, targets, (2, 3))
  expected = (training.cross_entropy(logits[:, :2], group) * 4
              + training.cross_entropy(logits[:2, 2:], within[:2]) * 2) / 4
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  # Images 2 and 3 carry no head-1 targets: the head-1 logits get no gradient from them.
  grads = jax.grad(training.segmented_cross_entropy)(logits, targets, (2, 3))
  np.testing.assert_array_equal(grads[2:, 2:], 0.0)
  assert np.abs(grads[:2, 2:]).sum() > 0


def test_class_balanced_draws_balance_the_strata_when_given():
  """`by_class` group networks: strata are the classes (4 of them), labels the 2 groups; every
  class is drawn equally often, so the 3-class group three times as often as the 1-class one."""
  classes = np.repeat(np.arange(4), [40, 20, 5, 5])
  groups = np.array([0, 0, 0, 1])[classes]
  balance, strata = training.over_classes(training.Balance("by_class"), classes, 4)
  assert balance.sampling == "class_balanced" and balance.num_strata == 4
  np.testing.assert_array_equal(strata, classes)
  spec = _spec(sampling="class_balanced", num_classes=2, num_strata=4, batch_size=50,
               steps_per_epoch=4)
  draws = np.concatenate([np.asarray(training.epoch_indices(jax.random.key(k), jnp.asarray(strata),
                                                           spec)).ravel() for k in range(20)])
  np.testing.assert_allclose(np.bincount(classes[draws], minlength=4) / len(draws), 0.25,
                             atol=0.02)
  np.testing.assert_allclose(np.bincount(groups[draws], minlength=2) / len(draws), [0.75, 0.25],
                             atol=0.02)
  unchanged, none = training.over_classes(training.Balance("class_balanced"), classes, 4)
  assert unchanged == training.Balance("class_balanced") and none is None


def test_a_network_of_several_heads_trains_with_plain_ce_only():
  with pytest.raises(Exception, match="several heads trains with loss 'ce'"):
    _spec(segments=(2, 3), loss="balanced_softmax")


def _pytorch_adamw(params, m, v, grads, lr, step, weight_decay, b1=0.9, b2=0.999, eps=1e-8):
  """torch.optim.AdamW's step on the decayed leaves (ndim > 1; the rest as weight_decay=0)."""
  new_p, new_m, new_v = {}, {}, {}
  for k, p in params.items():
    wd = weight_decay if p.ndim > 1 else 0.0
    p = p * (1 - lr * wd)
    new_m[k] = b1 * m[k] + (1 - b1) * grads[k]
    new_v[k] = b2 * v[k] + (1 - b2) * grads[k] ** 2
    m_hat, v_hat = new_m[k] / (1 - b1 ** step), new_v[k] / (1 - b2 ** step)
    new_p[k] = p - lr * m_hat / (jnp.sqrt(v_hat) + eps)
  return new_p, new_m, new_v


def test_adamw_is_pytorch_adamw_with_decay_on_kernels_alone():
  spec = _spec(optimizer="adamw", weight_decay=0.01)
  rng = np.random.default_rng(0)
  params = {"kernel": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
  state = training.init_state(spec, params)
  p_optax, opt_state = params, state["opt_state"]
  p_torch = params
  m = v = jax.tree.map(jnp.zeros_like, params)
  step_fn = jax.jit(lambda p, s, g, lr: training.optimizer(spec, lr).update(g, s, p))
  for step, lr in enumerate([0.001, 0.001, 0.0005], start=1):
    g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    updates, opt_state = step_fn(p_optax, opt_state, g, jnp.float32(lr))
    p_optax = optax.apply_updates(p_optax, updates)
    p_torch, m, v = _pytorch_adamw(p_torch, m, v, g, lr, step, 0.01)
  chex.assert_trees_all_close(p_optax, p_torch, rtol=1e-6, atol=1e-7)
  # Without gradient, only the kernel decays.
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = training.adamw(spec, 1.0).update(zero, training.adamw(spec, 1.0).init(params), params)
  np.testing.assert_array_equal(updates["bias"], 0.0)
  np.testing.assert_allclose(updates["kernel"], -0.01 * params["kernel"], rtol=1e-6)


def _linear_epoch(spec, data, key=0):
  apply_fn = lambda p, x: x.reshape(len(x), -1) @ p["w"]
  params = {"w": jnp.zeros((4, 3))}
  state = training.init_state(spec, params)
  return training.train_epoch(apply_fn, spec, state, jax.random.key(key), jnp.float32(0.1), data)


def test_temperature_divides_the_logits_of_the_loss():
  rng = np.random.default_rng(2)
  data = {"images": jnp.asarray(rng.normal(size=(8, 2, 2, 1)), jnp.float32),
          "targets": jax.nn.softmax(jnp.asarray(rng.normal(size=(8, 3)), jnp.float32))}
  data["labels"] = data["targets"].argmax(-1)
  spec = _spec(batch_size=8, steps_per_epoch=1, temperature=4.0)
  apply_fn = lambda p, x: x.reshape(len(x), -1) @ p["w"]
  params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
  _, loss = training.train_epoch(apply_fn, spec, training.init_state(spec, params),
                                 jax.random.key(0), jnp.float32(0.0), data)
  logits = apply_fn(params, data["images"])  # one batch of all 8 images, in some order
  np.testing.assert_allclose(float(loss), float(training.cross_entropy(logits / 4.0,
                                                                       data["targets"])),
                             rtol=1e-5)


def test_cutmix_batch_mixes_stored_targets_by_the_area_each_image_keeps():
  images = jnp.arange(6, dtype=jnp.float32)[:, None, None, None] * jnp.ones((6, 8, 8, 1))
  labels = jnp.asarray([0, 1, 2, 0, 1, 2])
  spec = _spec(num_classes=3, mix="cutmix")
  mixed, targets = training.cutmix_batch(jax.random.key(5), images, labels, spec)
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
  for i in range(6):
    own = float(np.isclose(mixed[i], i).mean())  # share of image i still its own
    others = set(np.unique(np.asarray(mixed[i])).round().astype(int).tolist()) - {i}
    partner = others.pop() if others else i
    expected = own * np.eye(3)[int(labels[i])] + (1 - own) * np.eye(3)[int(labels[partner])]
    np.testing.assert_allclose(targets[i], expected, atol=1e-6)


def test_cutmix_epoch_trains_and_unmixed_draws_are_unchanged():
  rng = np.random.default_rng(3)
  data = {"images": jnp.asarray(rng.normal(size=(8, 2, 2, 1)), jnp.float32),
          "targets": jnp.asarray(rng.integers(0, 3, 8), jnp.int32)}
  data["labels"] = data["targets"]
  plain = _spec(batch_size=4, steps_per_epoch=2)
  state_plain, _ = _linear_epoch(plain, data)
  state_mixed, loss = _linear_epoch(_spec(batch_size=4, steps_per_epoch=2, mix="cutmix"), data)
  assert np.isfinite(float(loss))
  assert not np.array_equal(state_plain["params"]["w"], state_mixed["params"]["w"])
  with pytest.raises(Exception, match="Unknown mix"):
    _spec(mix="mixup")
  with pytest.raises(Exception, match="Unknown optimizer"):
    _spec(optimizer="adam")
  with pytest.raises(Exception, match="trains unmixed"):
    _spec(mix="cutmix", segments=(2, 1))
