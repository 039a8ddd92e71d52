"""The supervised-training core shared by experts, evaluation and two-stage classifiers.

Everything here is pure and written for one model; `over_ensemble` runs it for every network of an
ensemble (K experts, T evaluation networks) inside one compiled program. SGD follows PyTorch's semantics
(weight decay added to the gradient, momentum without dampening), the optimiser every published
dataset-distillation result uses.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ltdd_jax import errors, models, parallel
from ltdd_jax.data import augment

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]
SAMPLINGS = ("instance", "class_balanced")
LOSSES = ("ce", "balanced_softmax")


WEIGHT_REDUCTIONS = ("batch", "weighted_mean")


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None,
                  weight_reduction: str = "batch") -> jax.Array:
  """Mean cross-entropy, optionally class-weighted.

  Args:
    logits: [N, C].
    targets: [N] int labels, or [N, C] target probabilities (soft labels).
    weights: optional [C] per-class weights (hard labels: of the true class; soft: each class's
      term of the soft cross-entropy).
    weight_reduction: with weights, `batch` sums the weighted terms and divides by N (LTDD's DAM:
      the weights set the step size), `weighted_mean` divides by the summed weights of the targets
      instead (a weighted average, whose normaliser also depends on soft targets).

  Returns:
    Scalar loss.
  """
  log_p = jax.nn.log_softmax(logits)
  if weights is None:
    if targets.ndim == 1:
      return -jnp.take_along_axis(log_p, targets[:, None], axis=1)[:, 0].mean()
    return -(targets * log_p).sum(-1).mean()
  soft = targets if targets.ndim == 2 else jax.nn.one_hot(targets, logits.shape[-1])
  weighted = soft * weights
  if weight_reduction == "batch":
    return -(weighted * log_p).sum() / logits.shape[0]
  if weight_reduction == "weighted_mean":
    return -(weighted * log_p).sum() / weighted.sum()
  raise errors.InputError(f"Unknown weight reduction {weight_reduction!r}; accepted: {WEIGHT_REDUCTIONS}.")


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """How one network trains (hashable, so it can be closed over by jitted functions).

  Attributes:
    batch_size: images per step.
    steps_per_epoch: steps in one epoch.
    momentum: SGD momentum.
    weight_decay: L2 added to the gradient.
    sampling: `instance` (shuffle) or `class_balanced` (every class equally likely).
    loss: `ce` or `balanced_softmax` (logits + log prior, Ren et al. 2020).
    dsa: apply DSA to every batch.
    head_only: update only params['head'] (classifier re-training); the rest stays bit-identical.
  """
  batch_size: int
  steps_per_epoch: int
  momentum: float
  weight_decay: float
  sampling: str = "instance"
  loss: str = "ce"
  dsa: bool = True
  head_only: bool = False

  def __post_init__(self):
    if self.sampling not in SAMPLINGS:
      raise errors.InputError(f"Unknown sampling {self.sampling!r}; accepted: {SAMPLINGS}.")
    if self.loss not in LOSSES:
      raise errors.InputError(f"Unknown loss {self.loss!r}; accepted: {LOSSES}.")


def steps_per_epoch(num_images: int, batch_size: int) -> int:
  """ceil(N / B): every image is seen once per epoch (the last batch wraps around)."""
  return max(1, -(-num_images // batch_size))


BALANCED_EPOCHS = ("max_class", "dataset")


def epoch_size(labels: np.ndarray, num_classes: int, sampling: str, balanced_epoch: str) -> int:
  """Images one epoch draws: N for `instance` sampling; for `class_balanced`, max_c n_c x C
  (`max_class`: what the class-aware sampler of LTDD's classifier experts counts, so every class
  is drawn as often as the largest one has images) or N (`dataset`)."""
  if sampling == "class_balanced" and balanced_epoch == "max_class":
    return int(np.bincount(np.asarray(labels), minlength=num_classes).max()) * num_classes
  if balanced_epoch not in BALANCED_EPOCHS:
    raise errors.InputError(f"Unknown experts.balanced_epoch {balanced_epoch!r}; accepted: "
                     f"{BALANCED_EPOCHS}.")
  return len(labels)


def epoch_indices(key: jax.Array, labels: jax.Array, spec: TrainSpec,
                  num_classes: int) -> jax.Array:
  """Indices of the images each step of one epoch trains on, [steps, batch].

  `instance`: one random permutation, tiled if the epoch needs more indices than images.
  `class_balanced`: a class uniformly at random, then an image of it (with replacement).
  """
  n = labels.shape[0]
  total = spec.steps_per_epoch * spec.batch_size
  if spec.sampling == "instance":
    perm = jax.random.permutation(key, n)
    idx = jnp.tile(perm, -(-total // n))[:total]
  else:
    counts = jnp.bincount(labels, length=num_classes)
    p = 1.0 / (num_classes * counts[labels].astype(jnp.float32))
    idx = jax.random.choice(key, n, (total,), p=p)
  return idx.reshape(spec.steps_per_epoch, spec.batch_size)


def sgd_update(params: PyTree, velocity: PyTree, grads: PyTree, lr: jax.Array, momentum: float,
               weight_decay: float) -> tuple[PyTree, PyTree]:
  """PyTorch SGD: g += wd * p; v = momentum * v + g; p -= lr * v."""
  grads = jax.tree.map(lambda g, p: g + weight_decay * p, grads, params)
  velocity = jax.tree.map(lambda v, g: momentum * v + g, velocity, grads)
  params = jax.tree.map(lambda p, v: p - lr * v, params, velocity)
  return params, velocity


def train_epoch(apply_fn: ApplyFn, spec: TrainSpec, dsa_config, params: PyTree, velocity: PyTree,
                key: jax.Array, lr: jax.Array, images: jax.Array, targets: jax.Array,
                labels: jax.Array, num_classes: int) -> tuple[PyTree, PyTree, jax.Array]:
  """One epoch of SGD for one network (vmap it for an ensemble).

  Eleven parameters, on purpose: this is the per-network kernel `over_ensemble` maps, and every
  array argument takes its own in_axes entry there (per network: params, velocity, key; shared:
  lr, images, targets, labels); `make_epoch_fn` binds the static ones (apply_fn, spec,
  dsa_config, num_classes) with `functools.partial`.

  Args:
    apply_fn: (params, images [B, H, W, C]) -> logits [B, C].
    spec: the `TrainSpec`.
    dsa_config: `config.dsa` (used when spec.dsa).
    params, velocity: the network's parameters and SGD momentum buffers.
    key: PRNG key for this network and epoch.
    lr: learning rate (scalar).
    images: [N, H, W, C] training images.
    targets: [N] int labels or [N, C] soft targets.
    labels: [N] int labels used for class-balanced sampling and the balanced-softmax prior.
    num_classes: C.

  Returns:
    (params, velocity, mean training loss of the epoch).
  """
  images, targets, labels = jnp.asarray(images), jnp.asarray(targets), jnp.asarray(labels)
  order_key, aug_key = jax.random.split(key)
  batches = epoch_indices(order_key, labels, spec, num_classes)
  log_prior = jnp.log(jnp.bincount(labels, length=num_classes).astype(jnp.float32) + 1e-12)

  def loss_fn(p, x, t):
    logits = apply_fn(p, x)
    if spec.loss == "balanced_softmax":
      logits = logits + log_prior
    return cross_entropy(logits, t)

  def step(carry, inputs):
    p, v = carry
    idx, k = inputs
    x = images[idx]
    if spec.dsa:
      x = augment.augment(k, x, dsa_config)
    t = targets[idx]
    if spec.head_only:  # Differentiate w.r.t. the head alone; the backbone is a constant.
      loss, grads = jax.value_and_grad(lambda h: loss_fn({**p, "head": h}, x, t))(p["head"])
      head, head_v = sgd_update(p["head"], v["head"], grads, lr, spec.momentum, spec.weight_decay)
      return ({**p, "head": head}, {**v, "head": head_v}), loss
    loss, grads = jax.value_and_grad(loss_fn)(p, x, t)
    return sgd_update(p, v, grads, lr, spec.momentum, spec.weight_decay), loss

  keys = jax.random.split(aug_key, spec.steps_per_epoch)
  (params, velocity), losses = jax.lax.scan(step, (params, velocity), (batches, keys))
  return params, velocity, losses.mean()


def init_ensemble(model, key: jax.Array, num_models: int, image_shape: tuple[int, ...]) -> PyTree:
  """Initial parameters of `num_models` networks, stacked on a leading axis: {'backbone', 'head'}."""
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  keys = jax.random.split(key, num_models)
  return jax.vmap(lambda k: model.init(k, dummy)["params"])(keys)


def make_apply(model) -> ApplyFn:
  """(params, images) -> logits for a Flax module whose variables are {'params': params}."""
  return lambda params, images: model.apply({"params": params}, images)


ENSEMBLE_IMPLS = ("auto", "vmap", "map")
# Measured (bench/experts.py; bench/RESULTS.md, "K experts in one program"): on CPU, lax.map over
# 3 ConvNets trains 1.5x and predicts 2x faster than vmap, whose batched matmuls XLA:CPU runs
# poorly; accelerators want vmap.
_FASTEST_ENSEMBLE = {"cpu": "map"}


def resolve_ensemble_impl(impl: str) -> str:
  """Maps `auto` to the measured-fastest way of running an ensemble on the default backend."""
  return parallel.resolve_for_backend("model.ensemble_impl", impl, ENSEMBLE_IMPLS,
                                      _FASTEST_ENSEMBLE, "vmap")


def over_ensemble(fn: Callable, in_axes: tuple[int | None, ...], impl: str) -> Callable:
  """`fn` applied to every network of an ensemble: arguments with in_axis 0 are stacked per network,
  those with None are shared. `impl`: vmap (all networks at once) or map (`lax.map`, one after
  another inside the same program); both give the same values."""
  impl = resolve_ensemble_impl(impl)
  if impl == "vmap":
    return jax.vmap(fn, in_axes=in_axes)

  def mapped(*args):
    stacked = tuple(a for a, axis in zip(args, in_axes) if axis == 0)

    def one(per_network):
      it = iter(per_network)
      return fn(*(next(it) if axis == 0 else a for a, axis in zip(args, in_axes)))

    return jax.lax.map(one, stacked)

  return mapped


@functools.lru_cache(maxsize=64)
def predict_fn(model, ensemble_impl: str) -> Callable:
  """jit(ensemble forward pass) of a Flax model, built once per (model, impl): Flax modules compare
  and hash by value, so every evaluation of the same architecture reuses one compiled program."""
  return jax.jit(over_ensemble(make_apply(model), (0, None), ensemble_impl))


def predict(model, params: PyTree, images: np.ndarray, batch_size: int,
            ensemble_impl: str) -> np.ndarray:
  """Logits of an ensemble on a dataset, in batches. params: [T, ...]; returns [T, N, C]."""
  fn = predict_fn(model, ensemble_impl)
  out = [np.asarray(fn(params, jnp.asarray(images[i:i + batch_size])))
         for i in range(0, len(images), batch_size)]
  return np.concatenate(out, axis=1)


def model_logits(model, params: PyTree, images: np.ndarray, batch_size: int = 1000,
                 ensemble_impl: str = "auto") -> np.ndarray:
  """Logits [T, N, C] of T networks of `model` (params [T, ...]) on images, with the forward-pass
  convolution (`models.for_inference`), in batches of `batch_size`."""
  return predict(models.for_inference(model), params, images, batch_size, ensemble_impl)
