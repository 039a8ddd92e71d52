"""The supervised-training kernel every ensemble trains with: losses, batch sampling, one epoch.

Everything here is pure and written for one network; `core.ensemble` runs it for every network of an
ensemble (K experts, T evaluation networks) inside one compiled program. The optimiser is PyTorch's
SGD (weight decay added to the gradient, momentum without dampening), the one every published
trajectory-matching result uses, or PyTorch's AdamW (the student recipe of the statistics-matching
family's parents), built from optax.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ltdd_jax import errors
from ltdd_jax.core import augment

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]
SAMPLINGS = ("instance", "class_balanced")
LOSSES = ("ce", "balanced_softmax")
OPTIMIZERS = ("sgd", "adamw")
MIXES = ("none", "cutmix")


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
    weight_decay: SGD's L2 added to the gradient, or AdamW's decoupled decay (`optimizer`).
    num_classes: C of the labels (class-balanced sampling and the balanced-softmax prior count them).
    sampling: `instance` (shuffle) or `class_balanced` (every class equally likely).
    loss: `ce` or `balanced_softmax` (logits + log prior, Ren et al. 2020).
    augment: DSA applied to every batch (None: no augmentation).
    head_only: update only params['head'] (classifier re-training); the rest stays bit-identical.
    num_strata: class-balanced sampling balances `data["strata"]` over this many values (e.g.
      the classes of a group network's images, so each class is drawn equally often, or the
      groups of a shared two-stage network's); 0: it balances `labels` over `num_classes`.
    segments: the logits are consecutive heads of these sizes (`models.MultiHead`) and the loss
      is the sum of each head's cross-entropy against its slice of the targets
      (`segmented_cross_entropy`); (): one head.
    optimizer: `sgd` (PyTorch's SGD: `momentum`, L2 `weight_decay` on every parameter) or
      `adamw` (PyTorch's AdamW, betas (0.9, 0.999), eps 1e-8, decoupled `weight_decay` on the
      kernels alone: parameters of more than one dimension, as RDED's student groups them).
    mix: `cutmix` pastes a box of a permuted batch into every augmented batch
      (`augment.cutmix`, lam ~ Beta(mix_beta, mix_beta)); stored targets mix by the area each
      image keeps, a teacher relabels the mixed images; `none`: no mixing.
    mix_beta: CutMix's Beta parameter.
    temperature: the loss is the cross-entropy of the targets against softmax(logits /
      temperature): knowledge distillation at temperature T (its gradient is that of the KL
      divergence RDED's student minimises, which differs by the targets' entropy).
  """
  batch_size: int
  steps_per_epoch: int
  momentum: float
  weight_decay: float
  num_classes: int
  sampling: str = "instance"
  loss: str = "ce"
  augment: augment.DSASpec | None = None
  head_only: bool = False
  num_strata: int = 0
  segments: tuple[int, ...] = ()
  optimizer: str = "sgd"
  mix: str = "none"
  mix_beta: float = 1.0
  temperature: float = 1.0

  def __post_init__(self):
    if self.optimizer not in OPTIMIZERS:
      raise errors.InputError(f"Unknown optimizer {self.optimizer!r}; accepted: {OPTIMIZERS}.")
    if self.mix not in MIXES:
      raise errors.InputError(f"Unknown mix {self.mix!r}; accepted: {MIXES}.")
    if self.mix != "none" and self.segments:
      raise errors.InputError("A network of several heads trains unmixed (mix='none'): a mixed "
                              "image's targets would span two heads' classes.")
    if self.sampling not in SAMPLINGS:
      raise errors.InputError(f"Unknown sampling {self.sampling!r}; accepted: {SAMPLINGS}.")
    if self.loss not in LOSSES:
      raise errors.InputError(f"Unknown loss {self.loss!r}; accepted: {LOSSES}.")
    if self.segments and self.loss != "ce":
      raise errors.InputError(f"A network of several heads trains with loss 'ce', not "
                              f"{self.loss!r}.")


def segmented_cross_entropy(logits: jax.Array, targets: jax.Array,
                            segments: tuple[int, ...]) -> jax.Array:
  """Sum over heads of each head's soft cross-entropy, averaged over the batch.

  Args:
    logits: [N, sum(segments)], consecutive heads of the given sizes.
    targets: [N, sum(segments)] target probabilities per head; a head whose slice of an image's
      targets is all zero takes no loss, hence no gradient, from that image.
    segments: the heads' sizes.
  """
  bounds = np.cumsum((0, *segments))
  total = 0.0
  for a, b in zip(bounds[:-1], bounds[1:]):
    total = total - (targets[:, a:b] * jax.nn.log_softmax(logits[:, a:b])).sum(-1)
  return total.mean()


@dataclasses.dataclass(frozen=True)
class Balance:
  """How a set of networks counters imbalance: `sampling` (instance | class_balanced | by_class),
  `loss` (ce | balanced_softmax) and, for class-balanced sampling, the epoch length
  (`balanced_epoch`: max_class | dataset). None keeps the default of whoever trains (the experts'
  config values; the evaluation protocol's instance sampling and plain CE).

  `by_class` is for networks whose labels are coarser than the classes (group networks): every
  class is drawn equally often, so a group in proportion to its number of classes
  (`over_classes` turns it into class-balanced draws over the images' classes)."""
  sampling: str | None = None
  loss: str | None = None
  balanced_epoch: str | None = None
  num_strata: int = 0


BALANCE_SAMPLINGS = (*SAMPLINGS, "by_class")


def over_classes(balance: Balance, classes: np.ndarray,
                 num_classes: int) -> tuple[Balance, np.ndarray | None]:
  """(the Balance a TrainSpec runs, strata or None): `by_class` becomes class-balanced sampling
  over `classes` ([N] the images' classes, of `num_classes`), returned as the strata the epoch
  draws balance (`TrainSpec.num_strata`); any other sampling is returned as it is, without."""
  if balance.sampling != "by_class":
    return balance, None
  return (dataclasses.replace(balance, sampling="class_balanced", num_strata=num_classes),
          np.asarray(classes, np.int32))


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


def epoch_indices(key: jax.Array, labels: jax.Array, spec: TrainSpec) -> jax.Array:
  """Indices of the images each step of one epoch trains on, [steps, batch].

  `instance`: one random permutation, tiled if the epoch needs more indices than images.
  `class_balanced`: a value of `labels` ([N] ints: the classes, or the strata of `num_strata`)
  uniformly at random, then an image of it (with replacement).
  """
  n = labels.shape[0]
  total = spec.steps_per_epoch * spec.batch_size
  if spec.sampling == "instance":
    perm = jax.random.permutation(key, n)
    idx = jnp.tile(perm, -(-total // n))[:total]
  else:
    num = spec.num_strata or spec.num_classes
    counts = jnp.bincount(labels, length=num)
    p = 1.0 / (num * counts[labels].astype(jnp.float32))
    idx = jax.random.choice(key, n, (total,), p=p)
  return idx.reshape(spec.steps_per_epoch, spec.batch_size)


def soft_targets(targets: jax.Array, num_classes: int) -> jax.Array:
  """[B, C] target probabilities of [B] int labels (one-hot) or [B, C] soft targets (as they are)."""
  return jax.nn.one_hot(targets, num_classes) if targets.ndim == 1 else targets


def cutmix_batch(key: jax.Array, images: jax.Array, targets: jax.Array,
                 spec: TrainSpec) -> tuple[jax.Array, jax.Array]:
  """A CutMix of an augmented batch (`augment.cutmix`, Beta(`spec.mix_beta`)) and its stored
  targets mixed by area: kept x own + (1 - kept) x partner's ([B, C] probabilities)."""
  mixed, partner, kept = augment.cutmix(key, images, spec.mix_beta)
  own = soft_targets(targets, spec.num_classes)
  return mixed, kept * own + (1.0 - kept) * own[partner]


def sgd(spec: TrainSpec, lr: jax.Array | float) -> optax.GradientTransformation:
  """PyTorch's SGD as optax: g += weight_decay * p; v = momentum * v + g; p -= lr * v.

  `lr` may be a traced scalar: the transformation's state (the momentum buffer) does not depend on
  it, so one state serves an lr that changes between epochs."""
  return optax.chain(optax.add_decayed_weights(spec.weight_decay),
                     optax.sgd(lr, momentum=spec.momentum))


def adamw(spec: TrainSpec, lr: jax.Array | float) -> optax.GradientTransformation:
  """PyTorch's AdamW as optax: p -= lr * (m_hat / (sqrt(v_hat) + 1e-8) + weight_decay * p), the
  decay on kernels (leaves of more than one dimension) alone; biases and norm scales are not
  decayed. `lr` may be traced (the moments do not depend on it)."""
  return optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=spec.weight_decay,
                     mask=lambda params: jax.tree.map(lambda p: p.ndim > 1, params))


def optimizer(spec: TrainSpec, lr: jax.Array | float) -> optax.GradientTransformation:
  """The spec's optimiser (`sgd` or `adamw`) at learning rate `lr`."""
  return adamw(spec, lr) if spec.optimizer == "adamw" else sgd(spec, lr)


def init_state(spec: TrainSpec, params: PyTree) -> PyTree:
  """One network's training state {params, opt_state} (the optimiser's buffers of what it
  trains: the head alone under `head_only`)."""
  trained = params["head"] if spec.head_only else params
  return {"params": params, "opt_state": optimizer(spec, 0.0).init(trained)}


def train_epoch(apply_fn: ApplyFn, spec: TrainSpec, state: PyTree, key: jax.Array, lr: jax.Array,
                data: dict, targets_fn: Callable | None = None) -> tuple[PyTree, jax.Array]:
  """One epoch of training (SGD or AdamW) for one network (`core.ensemble` maps it over an ensemble).

  Args:
    apply_fn: (params, images [B, H, W, C]) -> logits [B, C].
    spec: the `TrainSpec`.
    state: {params, opt_state} (`init_state`).
    key: PRNG key for this network and epoch.
    lr: learning rate (scalar).
    data: {images [N, H, W, C], targets [N] ints or [N, C] soft targets, labels [N] ints (class-
      balanced sampling and the balanced-softmax prior), optionally strata [N] ints (what class-
      balanced sampling balances instead of labels: `spec.num_strata`)}.
    targets_fn: (data, augmented batch [B, H, W, C]) -> its targets [B, C], in place of the
      stored ones (a teacher relabelling every batch: `RelabelKernel`); None: `data["targets"]`.

  Returns:
    (state, mean training loss of the epoch).
  """
  images, targets, labels = (jnp.asarray(data[k]) for k in ("images", "targets", "labels"))
  order_key, aug_key = jax.random.split(key)
  strata = jnp.asarray(data["strata"]) if "strata" in data else labels
  batches = epoch_indices(order_key, strata, spec)
  log_prior = jnp.log(jnp.bincount(labels, length=spec.num_classes).astype(jnp.float32) + 1e-12)
  tx = optimizer(spec, lr)

  def loss_fn(p, x, t):
    logits = apply_fn(p, x)
    if spec.temperature != 1.0:
      logits = logits / spec.temperature
    if spec.segments:
      return segmented_cross_entropy(logits, t, spec.segments)
    if spec.loss == "balanced_softmax":
      logits = logits + log_prior
    return cross_entropy(logits, t)

  def step(carry, inputs):
    p, opt_state = carry
    idx, k = inputs
    x = images[idx]
    if spec.mix != "none":  # Only then is the key split: unmixed training draws as it always has.
      k, mix_key = jax.random.split(k)
    if spec.augment is not None:
      x = augment.augment(k, x, spec.augment)
    if spec.mix == "none":
      t = targets[idx] if targets_fn is None else targets_fn(data, x)
    elif targets_fn is None:
      x, t = cutmix_batch(mix_key, x, targets[idx], spec)
    else:  # The teacher labels the mixed images.
      x = augment.cutmix(mix_key, x, spec.mix_beta)[0]
      t = targets_fn(data, x)
    if spec.head_only:  # Differentiate w.r.t. the head alone; the backbone is a constant.
      loss, grads = jax.value_and_grad(lambda h: loss_fn({**p, "head": h}, x, t))(p["head"])
      updates, opt_state = tx.update(grads, opt_state, p["head"])
      return ({**p, "head": optax.apply_updates(p["head"], updates)}, opt_state), loss
    loss, grads = jax.value_and_grad(loss_fn)(p, x, t)
    updates, opt_state = tx.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), loss

  keys = jax.random.split(aug_key, spec.steps_per_epoch)
  (params, opt_state), losses = jax.lax.scan(step, (state["params"], state["opt_state"]),
                                             (batches, keys))
  return {"params": params, "opt_state": opt_state}, losses.mean()


@dataclasses.dataclass(frozen=True)
class RelabelKernel:
  """`train_epoch` whose targets a frozen teacher computes on every augmented batch:
  softmax(teacher(x) / temperature), the teacher's variables in `data["teacher"]` (FKD-style
  relabelling: the student never fits a stored label). A `core.ensemble.Recipe` kernel.

  Attributes:
    teacher: the teacher's Flax module (applied as teacher.apply(data["teacher"], x)).
    temperature: the softmax temperature of its logits.
  """
  teacher: Any
  temperature: float = 1.0

  def __call__(self, apply_fn: ApplyFn, spec: TrainSpec, state: PyTree, key: jax.Array,
               lr: jax.Array, data: dict) -> tuple[PyTree, jax.Array]:
    def targets(data, images):
      logits = jax.lax.stop_gradient(self.teacher.apply(data["teacher"], images))
      return jax.nn.softmax(logits / self.temperature, axis=-1)
    return train_epoch(apply_fn, spec, state, key, lr, data, targets_fn=targets)
