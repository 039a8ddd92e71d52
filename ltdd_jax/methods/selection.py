"""Real-image selection baselines: `random` and `herding` IPC images per class (DESIGN §5)."""

from __future__ import annotations

import numpy as np

from ltdd_jax import errors, seeds


def per_class_indices(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
  """Indices of every class's images, in dataset order."""
  return [np.flatnonzero(labels == c) for c in range(num_classes)]


def check_ipc(labels: np.ndarray, num_classes: int, ipc: int, allow_duplicates: bool) -> None:
  """Fails clearly when a class has fewer than `ipc` images and duplication is not allowed."""
  counts = np.bincount(labels, minlength=num_classes)
  short = np.flatnonzero(counts < ipc)
  if ipc < 1:
    raise errors.InputError(f"ipc must be >= 1, got {ipc}.")
  if len(short) and not allow_duplicates:
    raise errors.InputError(
        f"ipc={ipc} but class {int(short[0])} has only {int(counts[short[0]])} training images "
        f"({len(short)} classes are short). Lower distill.ipc, or set "
        "distill.allow_duplicates=True to repeat the images of short classes.")
  if (counts == 0).any():
    raise errors.InputError(f"class {int(np.flatnonzero(counts == 0)[0])} has no training images.")


def random_selection(labels: np.ndarray, num_classes: int, ipc: int, seed: int,
                     allow_duplicates: bool = False) -> np.ndarray:
  """`ipc` random image indices per class, [C * ipc] grouped by class.

  A class with fewer images takes all of them, then repeats random ones (when allowed).
  """
  check_ipc(labels, num_classes, ipc, allow_duplicates)
  out = []
  for c, idx in enumerate(per_class_indices(labels, num_classes)):
    rng = np.random.default_rng([seed, c, seeds.RANDOM_SELECTION])
    take = rng.permutation(idx)[:ipc]
    if len(take) < ipc:
      take = np.concatenate([take, rng.choice(idx, ipc - len(take), replace=True)])
    out.append(take)
  return np.concatenate(out)


def herding_selection(features: np.ndarray, labels: np.ndarray, num_classes: int, ipc: int,
                      allow_duplicates: bool = False) -> np.ndarray:
  """Herding (Welling 2009): per class, greedily add the image that keeps the running mean of the
  selected features closest to the class mean. features: [N, F]; returns [C * ipc] indices."""
  check_ipc(labels, num_classes, ipc, allow_duplicates)
  out = []
  for idx in per_class_indices(labels, num_classes):
    feats = features[idx].astype(np.float64)
    mean = feats.mean(axis=0)
    chosen, total = [], np.zeros_like(mean)
    available = np.ones(len(idx), bool)
    for i in range(ipc):
      if not available.any():
        available[:] = True  # Short class: start another pass (duplicates).
      candidate = (total[None] + feats) / (i + 1)
      dist = np.linalg.norm(candidate - mean[None], axis=1)
      dist[~available] = np.inf
      best = int(np.argmin(dist))
      chosen.append(idx[best])
      available[best] = False
      total += feats[best]
    out.append(np.asarray(chosen))
  return np.concatenate(out)
