"""Batch-norm statistics of a trained network, per class: what statistics matching aligns with.

A batch-norm network trained on a long-tailed set keeps running statistics dominated by the head
classes. Here they are measured again, exactly and per class, by one frozen pass over the training
set (`class_statistics`): for every batch-norm layer l and class c, the per-channel mean and
variance of the layer's input over the class's images. The balanced target of a layer is the
uniform average over classes (`ClassStatistics.balanced`), so that every class counts the same
whatever its number of images. `statistics_loss` is the distance between a synthetic batch's
statistics and these targets, globally and class by class.

Every batch-norm layer records its input's per-image first and second moments when the `moments`
collection is mutable (`models.layers.Norm`); means and variances of any group of images follow
from them exactly (`group_moments`).
"""

from __future__ import annotations

import dataclasses
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ltdd_jax import errors

Moments = list[tuple[jax.Array, jax.Array]]  # per layer: ([N, ch] means, [N, ch] mean squares)


def _natural(path: tuple[str, ...]) -> tuple:
  """Sort key of a module path that orders `Norm_2` before `Norm_10`."""
  return tuple(int(p) if p.isdigit() else p for part in path for p in re.split(r"(\d+)", part))


def image_moments(model, params, images: jax.Array, batch_stats=None) -> Moments:
  """Per batch-norm layer, in network order: (per-image spatial mean [N, ch], per-image spatial
  mean square [N, ch]) of the layer's input.

  Args:
    model: a classifier whose backbone uses batch norm (`model.norm=batch`).
    params: its parameters.
    images: [N, H, W, C].
    batch_stats: the `batch_stats` collection when the backbone normalises with stored statistics
      (`stored_stats`); None: each layer normalises with the batch's own (training mode).
  """
  variables = {"params": params}
  if batch_stats is not None:
    variables["batch_stats"] = batch_stats
  _, state = model.apply(variables, images, mutable=["moments"])
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(state["moments"]))
  if not flat:
    raise errors.InputError("The network has no batch-norm layer (model.norm must be 'batch' for "
                            "statistics matching).")
  return [tuple(flat[path][0]) for path in sorted(flat, key=_natural)]


def group_moments(first: jax.Array, second: jax.Array, groups: jax.Array,
                  num_groups: int) -> tuple[jax.Array, jax.Array]:
  """(mean [G, ch], variance [G, ch]) of each group's images from their per-image moments
  ([N, ch] each; `groups` [N] ints). A group without images gets zeros."""
  onehot = jax.nn.one_hot(groups, num_groups, dtype=first.dtype)  # [N, G]
  size = jnp.maximum(onehot.sum(0), 1.0)[:, None]
  mean = onehot.T @ first / size
  return mean, onehot.T @ second / size - jnp.square(mean)


@dataclasses.dataclass(frozen=True)
class ClassStatistics:
  """Per-class input statistics of every batch-norm layer of a network.

  Attributes:
    means: per layer, [C, ch]: class c's per-channel mean of the layer's input.
    variances: per layer, [C, ch]: the same for the variance (biased, over images and pixels).
    counts: [C] images of each class the statistics were measured on.
  """
  means: tuple[np.ndarray, ...]
  variances: tuple[np.ndarray, ...]
  counts: np.ndarray

  @property
  def num_classes(self) -> int:
    return len(self.counts)

  def balanced(self) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """Per layer, the balanced global target (mean [ch], variance [ch]): the uniform average of
    the classes' statistics (a class's weight does not follow its number of images)."""
    return (tuple(m.mean(0) for m in self.means), tuple(v.mean(0) for v in self.variances))

  def grouped(self, group_of: np.ndarray) -> "ClassStatistics":
    """The statistics of the class groups given by `group_of` ([C] group of each class, groups
    0..G-1): a group's mean and variance are the uniform average of its classes' (as `balanced`
    averages every class), its count the sum of theirs."""
    group_of = np.asarray(group_of)
    num_groups = int(group_of.max()) + 1
    onehot = np.eye(num_groups, dtype=np.float64)[group_of]  # [C, G]
    share = onehot / onehot.sum(0)                              # uniform within each group
    average = lambda values: tuple((share.T @ v.astype(np.float64)).astype(np.float32)
                                   for v in values)
    return ClassStatistics(average(self.means), average(self.variances),
                           np.bincount(group_of, weights=self.counts,
                                       minlength=num_groups).astype(self.counts.dtype))

  def batch_stats(self, model, image_shape: tuple[int, ...]) -> dict:
    """The `batch_stats` collection that makes `model` (built with `stored_stats`:
    `models.with_stored_stats`) normalise every batch-norm layer with the balanced global
    target."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_shape)))
    if "batch_stats" not in shapes:
      raise errors.InputError("The network does not normalise with stored statistics; build it "
                              "with models.with_stored_stats.")
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes["batch_stats"]))
    layers = sorted({path[:-1] for path in flat}, key=_natural)
    means, variances = self.balanced()
    if len(layers) != len(means):
      raise errors.InputError(f"The network has {len(layers)} batch-norm layers; the statistics "
                              f"have {len(means)}.")
    out = {}
    for layer, mean, var in zip(layers, means, variances):
      out[(*layer, "mean")], out[(*layer, "var")] = jnp.asarray(mean), jnp.asarray(var)
    return flax.traverse_util.unflatten_dict(out)


def class_statistics(model, params, images: np.ndarray, labels: np.ndarray, num_classes: int,
                     batch_size: int, seed: int = 0) -> ClassStatistics:
  """Every batch-norm layer's per-class input statistics, by one frozen pass over `images`.

  The pass runs as the network trained (each batch normalised with its own statistics) over
  shuffled batches of `batch_size` (the last one filled up with images from the start, which are
  not counted twice), and every image's moments are accumulated exactly into its class's (sums of
  the per-image first and second moments), so a class's means and variances are those of all its
  layer inputs in the pass, not an exponential average. One compiled program serves every batch.

  Args:
    model, params: the trained batch-norm network.
    images: [N, H, W, C] its training images; labels: [N] their classes.
    num_classes: C (every class needs an image).
    batch_size: images per forward pass.
    seed: the batches' order.
  """
  labels = np.asarray(labels)
  counts = np.bincount(labels, minlength=num_classes)
  if (counts == 0).any():
    raise errors.InputError(f"Classes {np.flatnonzero(counts == 0).tolist()} have no images to "
                            "measure batch-norm statistics on.")
  n = len(labels)
  batch = min(batch_size, n)

  @jax.jit
  def class_sums(x, y, counted):
    onehot = jax.nn.one_hot(y, num_classes) * counted[:, None]  # [B, C]
    return [(onehot.T @ first, onehot.T @ second) for first, second in image_moments(model, params, x)]

  order = np.random.default_rng(seed).permutation(n)
  sums = None
  for start in range(0, n, batch):
    index = order[np.arange(start, start + batch) % n]
    counted = (np.arange(start, start + batch) < n).astype(np.float32)
    out = class_sums(jnp.asarray(images[index]), jnp.asarray(labels[index]), jnp.asarray(counted))
    out = [(np.asarray(f).astype(np.float64), np.asarray(q).astype(np.float64)) for f, q in out]
    sums = out if sums is None else [(a + f, b + q) for (a, b), (f, q) in zip(sums, out)]
  means = tuple((first / counts[:, None]).astype(np.float32) for first, _ in sums)
  variances = tuple((second / counts[:, None] - np.square(first / counts[:, None]))
                    .astype(np.float32) for first, second in sums)
  return ClassStatistics(means, variances, counts)


def groupwise_distances(moments: Moments, labels: jax.Array,
                        targets: ClassStatistics) -> list[jax.Array]:
  """Per layer, ||mean(S_k) - mu_k||_2 + ||var(S_k) - sigma2_k||_2 averaged over the label values
  k the batch holds (classes, or groups): S_k are the batch's images labelled k, `targets` holds
  k's statistics."""
  num = targets.num_classes
  present = jnp.zeros(num).at[labels].set(1.0)
  out = []
  for (first, second), mu, var in zip(moments, targets.means, targets.variances):
    mean_k, var_k = group_moments(first, second, labels, num)
    distance = jnp.linalg.norm(mean_k - mu, axis=-1) + jnp.linalg.norm(var_k - var, axis=-1)
    out.append((distance * present).sum() / present.sum())
  return out


def statistics_loss(moments: Moments, labels: jax.Array, targets: ClassStatistics,
                    class_weight: float = 1.0, layer_weights=None) -> jax.Array:
  """Distance of a batch's batch-norm statistics from the targets, summed over layers:
  ||mean(S) - mu_l||_2 + ||var(S) - sigma2_l||_2 against the balanced global target, plus
  `class_weight` times the same per class against class c's own statistics, averaged over the
  classes the batch holds.

  Args:
    moments: the batch's per-image moments (`image_moments`), per layer.
    labels: [N] the class each image stands for.
    targets: the `ClassStatistics` of the real training set.
    class_weight: weight of the class-wise term.
    layer_weights: each layer's weight (None: 1 each).
  """
  global_means, global_vars = targets.balanced()
  if layer_weights is None:
    layer_weights = [1.0] * len(moments)
  per_class = (groupwise_distances(moments, labels, targets) if class_weight
               else [0.0] * len(moments))
  total = 0.0
  for (first, second), mu, var, class_term, weight in zip(moments, global_means, global_vars,
                                                           per_class, layer_weights):
    batch_mean = first.mean(0)
    batch_var = second.mean(0) - jnp.square(batch_mean)
    layer = jnp.linalg.norm(batch_mean - mu) + jnp.linalg.norm(batch_var - var)
    if class_weight:
      layer = layer + class_weight * class_term
    total = total + weight * layer
  return total
