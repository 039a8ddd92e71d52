"""Statistics-matching synthesis (uni-level: Cui et al., AAAI 2026): images recovered from a
frozen observer's per-class batch-norm statistics, labelled by a teacher.

The observer and the teacher are batch-norm networks trained on the long-tailed set with the
robust and debias terms (`methods.observer`); their statistics are recalibrated per class by one
frozen pass (`methods.statistics`), and each then normalises with its balanced target. The
synthetic images start from real crops the teacher scores best (`initial_images`), and Adam moves
their pixels to minimise the teacher's cross-entropy on them plus the distance between their
per-layer statistics (under the observer) and the balanced global and class-wise targets
(`synthesis_loss`), each step on a random resized crop and flip of every image (`random_views`).
Their labels are the teacher's logits on the final images. `+hierarchical` splits the objective
into a group stage and a within-group stage (`GroupedSynthesis`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ltdd_jax import errors
from ltdd_jax.core import training
from ltdd_jax.methods import statistics


@dataclasses.dataclass(frozen=True)
class SynthesisSpec:
  """How the images are recovered (`config.unilevel`).

  Attributes:
    ipc: images per class.
    iterations: Adam steps on the pixels.
    lr, beta1, beta2: Adam's.
    ce_weight: weight of the teacher's cross-entropy.
    statistics_weight: weight of the batch-norm statistics distance.
    class_weight: weight of its class-wise term (beside the global one).
    first_multiplier: the first batch-norm layer's terms count this many times.
    crops: crops per real image scored for the initialisation.
    min_scale: random resized crops keep at least this share of the image's area.
    seed: crops, views.
  """
  ipc: int
  iterations: int = 1000
  lr: float = 0.05
  beta1: float = 0.5
  beta2: float = 0.9
  ce_weight: float = 1.0
  statistics_weight: float = 0.01
  class_weight: float = 1.0
  first_multiplier: float = 10.0
  crops: int = 5
  min_scale: float = 0.5
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class GroupedSynthesis:
  """The `+hierarchical` objective on statistics matching (`config.grouping`).

  The teacher's cross-entropy splits exactly into a group term, -log p(g(y)), and a within-group
  term, -log p(y | g(y)), with p(g) the sum of the group's class probabilities. Stage 1 weighs
  the group term and adds the distance of each group's images' statistics from the group's
  balanced target (`ClassStatistics.grouped`: the uniform average of its classes'); stage 2 is
  the flat objective with the within-group term in place of the flat cross-entropy. Both use the
  one observer and teacher: a group's own observer would see only that group's images (the tail
  group a few hundred at IF 100) at G times the observer training.

  Attributes:
    group_of: [C] each class's group (groups 0..G-1).
    lambda_1, lambda_2: the stage-1 and stage-2 weights.
  """
  group_of: tuple[int, ...]
  lambda_1: float = 1.0
  lambda_2: float = 1.0

  @property
  def num_groups(self) -> int:
    return max(self.group_of) + 1

  @property
  def stage1(self) -> bool:
    """Stage 1 is left out with one group or lambda_1 = 0."""
    return self.lambda_1 > 0 and self.num_groups > 1


def group_logits(logits: jax.Array, group_of, num_groups: int) -> jax.Array:
  """[N, C] class logits -> [N, G] group logits: log of the summed class probabilities (up to
  the shared normaliser), log sum_{c in g} exp(logit_c)."""
  member = jax.nn.one_hot(jnp.asarray(group_of), num_groups, dtype=bool).T  # [G, C]
  return jax.nn.logsumexp(jnp.where(member[None], logits[:, None, :], -jnp.inf), axis=-1)


def split_cross_entropy(logits: jax.Array, labels: jax.Array, group_of,
                        num_groups: int) -> tuple[jax.Array, jax.Array]:
  """(mean -log p(g(y)), mean -log p(y | g(y))) of [N, C] logits and [N] labels; they add up to
  the flat cross-entropy."""
  groups = jnp.asarray(group_of)[labels]
  by_group = group_logits(logits, group_of, num_groups)
  own_group = jnp.take_along_axis(by_group, groups[:, None], axis=1)[:, 0]
  own_class = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
  group_term = jax.nn.logsumexp(by_group, axis=-1) - own_group
  return group_term.mean(), (own_group - own_class).mean()


def resized_crop(image: jax.Array, top: jax.Array, left: jax.Array, side: jax.Array) -> jax.Array:
  """The square of `side` (a fraction of the image, in (0, 1]) at (`top`, `left`) (fractions of
  the height and width) resized back to the image's [H, W, C] (bilinear)."""
  height, width = image.shape[:2]
  scale = jnp.array([1.0 / side, 1.0 / side])
  translation = jnp.array([-top * height / side, -left * width / side])
  return jax.image.scale_and_translate(image, image.shape, (0, 1), scale, translation, "linear",
                                       antialias=False)


def random_view(key: jax.Array, image: jax.Array, min_scale: float) -> jax.Array:
  """A random resized crop (area share uniform in [min_scale, 1], square) of one [H, W, C]
  image, flipped horizontally half the time."""
  k_side, k_top, k_left, k_flip = jax.random.split(key, 4)
  side = jnp.sqrt(jax.random.uniform(k_side, minval=min_scale, maxval=1.0))
  top = jax.random.uniform(k_top) * (1.0 - side)
  left = jax.random.uniform(k_left) * (1.0 - side)
  view = resized_crop(image, top, left, side)
  return jnp.where(jax.random.bernoulli(k_flip), view[:, ::-1], view)


def random_views(key: jax.Array, images: jax.Array, min_scale: float) -> jax.Array:
  """`random_view` of every image of [N, H, W, C], each with its own key."""
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(lambda k, x: random_view(k, x, min_scale))(keys, images)


def select_crops(scores: np.ndarray, slots: int) -> list[tuple[int, int]]:
  """(image, crop) pairs filling `slots`, in rounds: each round every image offers its best
  crop not yet taken, and the best-scored offers fill the open slots; rounds repeat until the
  slots are full (a class with fewer images than slots gives several crops of an image).

  Args:
    scores: [M, K] score of crop k of real image m (higher: better).
    slots: images to choose.
  """
  ranked = np.argsort(-scores, axis=1, kind="stable")
  chosen = []
  for rank in range(scores.shape[1]):
    offers = sorted(range(len(scores)), key=lambda m: -scores[m, ranked[m, rank]])
    chosen += [(m, int(ranked[m, rank])) for m in offers[:slots - len(chosen)]]
    if len(chosen) == slots:
      return chosen
  raise errors.InputError(f"{len(scores)} images x {scores.shape[1]} crops cannot fill {slots} "
                          "slots; raise unilevel.crops.")


def initial_images(spec: SynthesisSpec, teacher_logits, images: np.ndarray, labels: np.ndarray,
                   num_classes: int, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
  """([C * ipc, H, W, C] images, [C * ipc] labels): `spec.crops` random resized crops of every
  real image scored by the teacher (its log-probability of the image's class), the best of each
  class chosen in rounds (`select_crops`).

  Crop k of image m is a function of (seed, m, k) alone, so the chosen crops are made again
  rather than kept: the scores of N x crops images are all that is held. Every forward pass has
  `batch_size` images (the last one padded), so one program serves the whole set.

  Args:
    teacher_logits: images [B, H, W, C] -> logits [B, C] (the frozen teacher, each image's logits
      independent of the rest of its batch).
  """
  labels = np.asarray(labels)
  n = len(labels)
  counts = np.bincount(labels, minlength=num_classes)
  if (counts == 0).any():
    raise errors.InputError(f"Class {int(np.flatnonzero(counts == 0)[0])} has no images to start "
                            "its synthetic images from.")
  base = jax.random.key(spec.seed)
  key_of = jax.vmap(lambda m, k: jax.random.fold_in(jax.random.fold_in(base, m), k))
  views = jax.jit(jax.vmap(lambda key, image: random_view(key, image, spec.min_scale)))
  score = jax.jit(lambda x, y: jnp.take_along_axis(
      jax.nn.log_softmax(teacher_logits(x)), y[:, None], axis=1)[:, 0])
  batch = min(batch_size, n)
  scores = np.zeros((n, spec.crops), np.float32)
  for start in range(0, n, batch):
    index = np.arange(start, start + batch) % n  # the last batch wraps around
    x, y = jnp.asarray(images[index]), jnp.asarray(labels[index])
    for k in range(spec.crops):
      keys = key_of(jnp.asarray(index), jnp.full(batch, k))
      scores[index[:min(batch, n - start)], k] = np.asarray(score(views(keys, x), y))[:n - start]
  chosen = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    chosen += [(members[m], k) for m, k in select_crops(scores[members], spec.ipc)]
  index = np.asarray([m for m, _ in chosen])
  keys = key_of(jnp.asarray(index), jnp.asarray([k for _, k in chosen]))
  return (np.asarray(views(keys, jnp.asarray(images[index])), np.float32),
          labels[index].astype(np.int32))


def synthesis_loss(spec: SynthesisSpec, teacher_logits, observer_moments,
                   targets: statistics.ClassStatistics, views: jax.Array, labels: jax.Array,
                   grouped: GroupedSynthesis | None = None) -> jax.Array:
  """ce_weight * CE(teacher(views), labels) + statistics_weight * the observer's batch-norm
  statistics distance (`statistics.statistics_loss`, the first layer's terms x
  first_multiplier). With `grouped` (`+hierarchical`), lambda_2 times that objective with the
  within-group cross-entropy in place of the flat one, plus (stage 1) lambda_1 times the group
  cross-entropy and the group-wise distance from the groups' targets (`targets.grouped`, made
  once when the step is traced)."""
  logits = teacher_logits(views)
  moments = observer_moments(views)
  layer_weights = [spec.first_multiplier] + [1.0] * (len(moments) - 1)
  distance = statistics.statistics_loss(moments, labels, targets, spec.class_weight,
                                        layer_weights)
  if grouped is None:
    return spec.ce_weight * training.cross_entropy(logits, labels) + spec.statistics_weight * distance
  group_ce, within_ce = split_cross_entropy(logits, labels, grouped.group_of, grouped.num_groups)
  loss = grouped.lambda_2 * (spec.ce_weight * within_ce + spec.statistics_weight * distance)
  if grouped.stage1:
    groups = jnp.asarray(grouped.group_of)[labels]
    group_targets = targets.grouped(np.asarray(grouped.group_of))
    group_distance = sum(w * d for w, d in zip(
        layer_weights, statistics.groupwise_distances(moments, groups, group_targets)))
    loss = loss + grouped.lambda_1 * (spec.ce_weight * group_ce
                                      + spec.statistics_weight * group_distance)
  return loss


def optimizer(spec: SynthesisSpec) -> optax.GradientTransformation:
  """Adam on the pixels with the spec's lr and betas."""
  return optax.adam(spec.lr, b1=spec.beta1, b2=spec.beta2)


def synthesis_step(spec: SynthesisSpec, teacher_logits, observer_moments,
                   targets: statistics.ClassStatistics, grouped: GroupedSynthesis | None = None):
  """jit((images, opt_state, key, labels) -> (images, opt_state, loss)): one Adam step of the
  pixels on a random view of every image (`synthesis_loss`, hierarchical with `grouped`); the
  networks are constants."""
  tx = optimizer(spec)

  def step(images, opt_state, key, labels):
    def loss_fn(pixels):
      views = random_views(key, pixels, spec.min_scale)
      return synthesis_loss(spec, teacher_logits, observer_moments, targets, views, labels,
                            grouped)
    loss, grads = jax.value_and_grad(loss_fn)(images)
    updates, opt_state = tx.update(grads, opt_state, images)
    return optax.apply_updates(images, updates), opt_state, loss

  return jax.jit(step)
