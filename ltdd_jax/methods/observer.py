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

import jax
import jax.numpy as jnp
import numpy as np

from ltdd_jax import errors

NORMALISATIONS = ("mean", "sum")


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


def cutmix_box(key: jax.Array, lam: jax.Array, height: int, width: int) -> jax.Array:
  """[H, W] float mask, 1 inside a box of area ~ (1 - lam) H W at a uniform centre (clipped at
  the border), 0 elsewhere: where CutMix pastes the partner image."""
  cut = jnp.sqrt(1.0 - lam)
  kh, kw = jax.random.split(key)
  cy = jax.random.uniform(kh, (), minval=0, maxval=height)
  cx = jax.random.uniform(kw, (), minval=0, maxval=width)
  half_h, half_w = cut * height / 2, cut * width / 2
  rows = jnp.arange(height)[:, None] + 0.5
  cols = jnp.arange(width)[None, :] + 0.5
  return ((jnp.abs(rows - cy) < half_h) & (jnp.abs(cols - cx) < half_w)).astype(jnp.float32)


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
  box = cutmix_box(k_box, lam, images.shape[1], images.shape[2])[None, :, :, None]
  cutmix = images * (1.0 - box) + partner_images * box
  kept = 1.0 - box.mean()  # the share of the image that is still the batch's own
  cutmix_targets = kept * targets + (1.0 - kept) * partner_targets
  return (mixup, mixup_targets), (cutmix, cutmix_targets)
