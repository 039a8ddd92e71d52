"""The one ensemble trainer: K networks trained as one compiled program, epoch by epoch.

Experts, evaluation networks, LTDD's classifier experts and the two-stage classifier's networks all
train through `train`: a `Recipe` (model, per-step spec, lr schedule, per-epoch keys) applied to
stacked states {params, opt_state} ([K, ...] leaves), with a pluggable `Store` deciding what is
saved when (experts: every epoch, in their trajectory layout; evaluation: on a timer, fingerprinted).
Epoch e's draws are a function of (seed, e) alone (`seeds.EpochKeys`), so a training resumed from
any save is bitwise the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from ltdd_jax import errors, interrupts, models, parallel, reporting, seeds
from ltdd_jax.core import training

PyTree = Any
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
  """`fn` applied to every network of an ensemble: arguments (pytrees) with in_axis 0 are stacked
  per network, those with None are shared. `impl`: vmap (all networks at once) or map (`lax.map`,
  one after another inside the same program); both give the same values."""
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


def make_apply(model) -> training.ApplyFn:
  """(params, images) -> logits for a Flax module whose variables are {'params': params}."""
  return lambda params, images: model.apply({"params": params}, images)


def init_params(model, key: jax.Array, num_models: int, image_shape: tuple[int, ...]) -> PyTree:
  """Initial parameters of `num_models` networks, stacked on a leading axis: {'backbone', 'head'}."""
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  keys = jax.random.split(key, num_models)
  return jax.vmap(lambda k: model.init(k, dummy)["params"])(keys)


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How an ensemble trains: model, per-step spec, lr schedule and per-epoch keys.

  Attributes:
    model: the Flax classifier.
    train: the `training.TrainSpec` of every step (batch, SGD, sampling, loss, DSA).
    lr: the learning rate.
    epochs: epochs to train.
    num_models: networks in the ensemble.
    init_seed: their initial parameters split `key(init_seed)` (`init_params`).
    keys: the per-epoch keys (`seeds.EpochKeys`).
    decay_epoch: from this epoch (0-based) on the lr is lr * 0.1 (the evaluation protocol's step
      at half the epochs); None: constant.
    warmup_epochs: the first epochs' lr rises linearly, lr * (epoch + 1) / warmup_epochs.
    cosine: after the warm-up the lr follows a cosine from lr towards 0 over the remaining
      epochs, per epoch (GLMC's schedule, which the statistics-matching observers take).
    half_cosine: the lr is lr * (1 + cos(pi * epoch / (2 * epochs))) / 2 per epoch, from lr to
      about lr / 2 (RDED's student schedule: a cosine over twice the epochs, its first half).
    ensemble_impl: how the networks run in one program (`over_ensemble`).
    kernel: one network's epoch, (apply_fn, spec, state, key, lr, data) -> (state, loss), when
      not `training.train_epoch` (e.g. the statistics-matching observers' two-view epoch); a
      frozen dataclass or a module-level function, so that recipes compare and hash by value.
      Its `data` holds the 0-based `epoch` besides the trainer's arrays.
  """
  model: Any
  train: training.TrainSpec
  lr: float
  epochs: int
  num_models: int
  init_seed: int
  keys: seeds.EpochKeys
  decay_epoch: int | None = None
  ensemble_impl: str = "auto"
  kernel: Any = None
  warmup_epochs: int = 0
  cosine: bool = False
  half_cosine: bool = False

  def __post_init__(self):
    if self.half_cosine and (self.cosine or self.warmup_epochs or self.decay_epoch is not None):
      raise errors.InputError("Recipe.half_cosine is a whole schedule: it takes no warm-up, "
                              "cosine or decay_epoch.")

  def lr_at(self, epoch: int) -> float:
    """The lr of epoch `epoch` (0-based)."""
    if self.half_cosine:
      return self.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / (2 * self.epochs)))
    if epoch < self.warmup_epochs:
      return self.lr * (epoch + 1) / self.warmup_epochs
    if self.cosine:
      span = self.epochs - self.warmup_epochs + 1
      return self.lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - self.warmup_epochs + 1) / span))
    if self.decay_epoch is None or epoch < self.decay_epoch:
      return self.lr
    return self.lr * 0.1


@functools.lru_cache(maxsize=32)
def epoch_program(model, spec: training.TrainSpec, ensemble_impl: str,
                  kernel: Callable | None = None) -> Callable:
  """jit((states [K, ...], keys [K], lr, data) -> (states, losses [K])): one epoch of every
  network (`kernel`, default `training.train_epoch`), built once per (model, spec, impl,
  kernel). The states are not donated: they are a few MB at most (the activations dominate), and
  callers keep the initial ones."""
  kernel = functools.partial(kernel or training.train_epoch, make_apply(model), spec)
  return jax.jit(over_ensemble(kernel, (0, 0, None, None), ensemble_impl))


def init_states(recipe: Recipe, image_shape: tuple[int, ...], params: PyTree | None = None) -> PyTree:
  """Stacked training states {params, opt_state} of the recipe's networks: from `params` ([K, ...]
  leaves) when given (classifier re-training starts from trained experts), else freshly
  initialised from `recipe.init_seed`."""
  if params is None:
    params = init_params(recipe.model, jax.random.key(recipe.init_seed), recipe.num_models,
                         image_shape)
  return jax.vmap(functools.partial(training.init_state, recipe.train))(params)


class Store(Protocol):
  """What a training keeps: where it resumes from and what it saves after each epoch."""

  def restore(self, states: PyTree) -> tuple[int, PyTree]:
    """(epochs already done, their states), or (0, `states`) when nothing is saved."""

  def wants(self, done: int, last: bool) -> bool:
    """Whether the states after `done` epochs are saved (`last`: the final epoch)."""

  def save(self, done: int, states: PyTree) -> None:
    """Saves the (finite) states after `done` epochs."""

  def finish(self, states: PyTree) -> None:
    """Called once every epoch is done."""


def all_finite(tree) -> bool:
  """Whether every leaf of a pytree is finite (one device-to-host transfer)."""
  return bool(jax.tree.reduce(jnp.logical_and, jax.tree.map(lambda x: jnp.isfinite(x).all(), tree)))


def train(recipe: Recipe, states: PyTree, data: dict, mesh, *, store: Store | None = None,
          diverged: Callable[[int, np.ndarray], errors.DivergedError],
          label: str = "train") -> PyTree:
  """Trains an ensemble for `recipe.epochs` epochs (resuming from `store`); returns the states.

  Args:
    recipe: the `Recipe`.
    states: initial stacked states (`init_states`), [recipe.num_models, ...] leaves; replaced by
      the store's when it has a save.
    data: {images, targets, labels} shared by every network (`training.train_epoch`).
    mesh: device mesh; the network axis is sharded over it.
    store: what is saved and resumed from (None: nothing).
    diverged: (epoch done, losses [K]) -> the error raised at the first epoch whose loss, or whose
      state before a save or at the end, is not finite (nothing non-finite is saved).
    label: progress label.
  """
  first = 0
  if store is not None:
    first, states = store.restore(states)
  states = parallel.shard_leading(states, mesh)
  data = parallel.replicate(jax.tree.map(jnp.asarray, data), mesh)
  program = epoch_program(recipe.model, recipe.train, recipe.ensemble_impl, recipe.kernel)
  progress = reporting.Progress(label, recipe.epochs, start=first)
  if first:
    progress.note(f"resuming from epoch {first}/{recipe.epochs}")
  with interrupts.safe_points():
    for epoch in range(first, recipe.epochs):
      states, losses = program(states, recipe.keys(epoch, recipe.num_models),
                               jnp.float32(recipe.lr_at(epoch)),
                               {**data, "epoch": jnp.int32(epoch)})
      losses = np.asarray(losses)
      done = epoch + 1
      last = done == recipe.epochs
      saving = store is not None and (store.wants(done, last) or interrupts.requested())
      # The loss is taken before each step's update: the state is checked too, where it matters
      # (before a save, and the networks returned).
      if not np.isfinite(losses).all() or ((saving or last) and not all_finite(states)):
        raise diverged(done, losses)
      progress.update(done, f"loss {float(losses.mean()):.3f}")
      if saving:
        store.save(done, states)
      if not last:  # Saved above when a store keeps anything: resumable from here.
        interrupts.check(f"{label} epoch {done}/{recipe.epochs}")
    if store is not None:
      store.finish(states)
  return states


def batched(fn: Callable, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
  """`fn` (a jitted forward pass of one network, [B, ...] -> [B, ...]) over `images` in batches of
  `batch_size`, concatenated along the first axis."""
  return np.concatenate([np.asarray(fn(images[i:i + batch_size]))
                         for i in range(0, len(images), batch_size)])


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


def logits(model, params: PyTree, images: np.ndarray, batch_size: int = 1000,
           ensemble_impl: str = "auto") -> np.ndarray:
  """Logits [T, N, C] of T networks of `model` (params [T, ...]) on images, with the forward-pass
  convolution (`models.for_inference`), in batches of `batch_size`."""
  return predict(models.for_inference(model), params, images, batch_size, ensemble_impl)
