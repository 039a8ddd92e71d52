"""The loss terms of the statistics-matching family's observer and teacher networks.

The uni-level framework (Cui et al., AAAI 2026) trains its experts on the long-tailed set with
a robust term and a debiasing term, L = gamma_1 * L_robust + gamma_2 * L_debias:
- `L_debias`: alpha * class-reweighted cross-entropy + (1 - alpha) * plain cross-entropy, the
  weights proportional to n_k^-q and alpha = (t / T)^2 growing over training (`debias_alpha`), so
  the experts learn the representation from the data as it is first and re-balance their
  decision later.
- `L_robust`: a symmetric cosine consistency between two mixed views of a batch: each view's
  predictor output against the other view's projection, the latter under stop-gradient
  (`consistency_loss`).
The two views mix each batch with a partner batch (`mix_views`: MixUp for one, CutMix for the
other, one lambda ~ Beta(1, 1) for both), whose labels the targets mix with the same weight.
Every function here is pure and written for one network.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ltdd_jax import errors, models
from ltdd_jax.core import augment, training

NORMALISATIONS = ("mean", "sum")
# The observers' lr per epoch: a linear warm-up, then a cosine towards 0 (GLMC's), or constant.
SCHEDULES = ("warmup_cosine", "constant")


def debias_weights(counts: np.ndarray, q: float, normalise: str = "mean") -> np.ndarray:
  """[C] class weights proportional to n_k^-q: `mean` scales them to average 1 (the debias term
  is then on the scale of plain cross-entropy), `sum` to sum to 1 (the formula as printed)."""
  counts = np.asarray(counts, np.float64)
  if (counts <= 0).any():
    raise errors.InputError(f"Every class needs training images for the debias weights; counts "
                            f"{counts.astype(int).tolist()}.")
  weights = counts ** -float(q)
  if normalise == "mean":
    return (weights / weights.sum() * len(counts)).astype(np.float32)
  if normalise == "sum":
    return (weights / weights.sum()).astype(np.float32)
  raise errors.InputError(f"Unknown debias normalisation {normalise!r}; accepted: "
                          f"{', '.join(NORMALISATIONS)}.")


def debias_weights_of(labels: jax.Array, num_classes: int, q: float,
                      normalise: str = "mean") -> jax.Array:
  """`debias_weights` of the class counts of `labels` ([N] ints), traced (inside the kernel)."""
  weights = jnp.maximum(jnp.bincount(labels, length=num_classes), 1).astype(jnp.float32) ** -q
  scale = num_classes if normalise == "mean" else 1.0
  return weights / weights.sum() * scale


def debias_alpha(step: jax.Array | int, total_steps: int) -> jax.Array:
  """alpha = (t / T)^2, the weight of the reweighted term at training step t of T."""
  return jnp.square(jnp.asarray(step, jnp.float32) / max(int(total_steps), 1))


def debias_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                alpha: jax.Array) -> jax.Array:
  """alpha * reweighted CE + (1 - alpha) * CE, averaged over the batch.

  Args:
    logits: [N, C].
    targets: [N, C] target probabilities (mixed one-hot labels).
    weights: [C] class weights (`debias_weights`).
    alpha: the schedule's weight of the reweighted term (`debias_alpha`).
  """
  log_p = jax.nn.log_softmax(logits)
  plain = -(targets * log_p).sum(-1)
  reweighted = -(targets * weights * log_p).sum(-1)
  return (alpha * reweighted + (1.0 - alpha) * plain).mean()


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """[N] cosine similarity of the rows of a and b ([N, D])."""
  a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-8)
  b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), 1e-8)
  return (a * b).sum(-1)


def consistency_loss(projections: tuple[jax.Array, jax.Array],
                     predictions: tuple[jax.Array, jax.Array]) -> jax.Array:
  """-(cos(p_1, sg(z_2)) + cos(p_2, sg(z_1))), averaged over the batch: each view's predictor
  output p_i ([N, D]) is drawn to the other view's projection z_i ([N, D]), which does not move
  for it (stop-gradient), so the predictor is what learns the map between views."""
  (z1, z2), (p1, p2) = projections, predictions
  z1, z2 = jax.lax.stop_gradient(z1), jax.lax.stop_gradient(z2)
  return -(_cosine(p1, z2) + _cosine(p2, z1)).mean()


def mix_views(key: jax.Array, images: jax.Array, targets: jax.Array, partner_images: jax.Array,
              partner_targets: jax.Array) -> tuple[tuple[jax.Array, jax.Array],
                                                   tuple[jax.Array, jax.Array]]:
  """Two mixed views of a batch ([N, H, W, C], targets [N, K]) with a partner batch: MixUp
  (lam x + (1 - lam) x') and CutMix (x' pasted in a box of area 1 - lam), with one
  lam ~ Beta(1, 1); each view's targets mix by the share of the image it took from each batch.

  Returns:
    ((mixup images, mixup targets), (cutmix images, cutmix targets)).
  """
  k_lam, k_box = jax.random.split(key)
  lam = jax.random.beta(k_lam, 1.0, 1.0)
  mixup = lam * images + (1.0 - lam) * partner_images
  mixup_targets = lam * targets + (1.0 - lam) * partner_targets
  cutmix, kept = augment.paste_box(k_box, lam, images, partner_images)
  cutmix_targets = kept * targets + (1.0 - kept) * partner_targets
  return (mixup, mixup_targets), (cutmix, cutmix_targets)


class ObserverNet(nn.Module):
  """A classifier with the heads the robust term needs: backbone(images) -> features, then
  `head` (logits [N, C]), `projector` (z [N, D]) and `predictor` (p = predictor(z) [N, D]).
  Its parameters hold a plain classifier's {'backbone', 'head'} (`as_classifier`)."""
  backbone: nn.Module
  num_classes: int
  projection_dim: int = 128
  weight_init: str = "torch"

  @nn.compact
  def __call__(self, images):
    features = self.backbone(images)
    logits = models.Dense(self.num_classes, init=self.weight_init, name="head")(features)
    z = models.Dense(self.projection_dim, init=self.weight_init, name="projector")(features)
    p = models.Dense(self.projection_dim, init=self.weight_init, name="predictor")(z)
    return logits, z, p


def as_classifier(net: ObserverNet, spec: models.ModelSpec) -> models.Classifier:
  """The observer as a plain classifier (backbone + head) over the same parameters."""
  return models.Classifier(net.backbone, models.make_head(spec, net.num_classes))


@dataclasses.dataclass(frozen=True)
class ObserverKernel:
  """One epoch of an observer (or teacher) network: L = robust_weight * consistency +
  debias_weight * debias over two mixed views of each batch (`mix_views`), with the partner
  batch drawn class-balanced and alpha = (t / T)^2 over the T = epochs x steps of training. A
  `core.ensemble.Recipe` kernel (hashable, so its program compiles once).

  Attributes:
    epochs: the training's epochs (T of the alpha schedule).
    q, normalise: the debias weights (`debias_weights`).
    robust_weight, debias_weight: gamma_1 and gamma_2.
  """
  epochs: int
  q: float = 0.8
  normalise: str = "mean"
  robust_weight: float = 1.0
  debias_weight: float = 1.0

  def __call__(self, apply_fn, spec: training.TrainSpec, state, key, lr, data):
    images, labels = jnp.asarray(data["images"]), jnp.asarray(data["labels"])
    order_key, partner_key, step_key = jax.random.split(key, 3)
    batches = training.epoch_indices(order_key, labels, spec)
    partners = training.epoch_indices(
        partner_key, labels, dataclasses.replace(spec, sampling="class_balanced"))
    onehot = jax.nn.one_hot(labels, spec.num_classes)
    weights = debias_weights_of(labels, spec.num_classes, self.q, self.normalise)
    total = self.epochs * spec.steps_per_epoch
    first = data["epoch"] * spec.steps_per_epoch
    tx = training.sgd(spec, lr)

    def loss_fn(params, views, alpha):
      (v1, t1), (v2, t2) = views
      l1, z1, p1 = apply_fn(params, v1)
      l2, z2, p2 = apply_fn(params, v2)
      debias = 0.5 * (debias_loss(l1, t1, weights, alpha) + debias_loss(l2, t2, weights, alpha))
      return (self.robust_weight * consistency_loss((z1, z2), (p1, p2))
              + self.debias_weight * debias)

    def step(carry, inputs):
      params, opt_state = carry
      idx, partner, k, s = inputs
      k_aug, k_partner, k_mix = jax.random.split(k, 3)
      x, y = images[idx], images[partner]
      if spec.augment is not None:
        x, y = augment.augment(k_aug, x, spec.augment), augment.augment(k_partner, y, spec.augment)
      views = mix_views(k_mix, x, onehot[idx], y, onehot[partner])
      loss, grads = jax.value_and_grad(loss_fn)(params, views, debias_alpha(first + s, total))
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    steps = spec.steps_per_epoch
    (params, opt_state), losses = jax.lax.scan(
        step, (state["params"], state["opt_state"]),
        (batches, partners, jax.random.split(step_key, steps), jnp.arange(steps)))
    return {"params": params, "opt_state": opt_state}, losses.mean()
