"""Long-tailed class profiles and the deterministic choice of which images each class keeps.

DESIGN §1: class c keeps n_c = floor(n_max * IF^(-c/(C-1))) images (`exp`), or n_max / n_max/IF for
the first / second half of the classes (`step`). A local test split (`holdout:K`) is set aside from
the training pool *before* the long-tailed subset is drawn. Validation is too (`pool`), or it takes
the images the long-tailed subset leaves over (`leftover`), so that only classes without enough
left over give up training images (at CIFAR's factors of 10 and above, the largest alone): with CIFAR-10's real test split, n_max = 5,000 and 100
validation images per class, IF 100 keeps 4,900 2,997 1,796 ... 50 (the published counts but the
first) where `pool` would keep 4,900 2,937 1,760 ... 49. Both stay balanced and never overlap the
training images.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ltdd_jax import errors

PROFILES = ("exp", "step")
VALIDATION_FROM = ("pool", "leftover")


def longtail_counts(n_max: int, num_classes: int, imbalance_factor: float,
                    profile: str = "exp") -> np.ndarray:
  """Per-class image counts of a long-tailed profile.

  Args:
    n_max: images kept by the largest (first) class.
    num_classes: C.
    imbalance_factor: IF = n_max / n_min, >= 1.
    profile: `exp` (exponential decay over the label order) or `step`.

  Returns:
    counts: [C] int64, counts[0] == n_max.
  """
  if imbalance_factor < 1:
    raise errors.InputError(f"imbalance_factor must be >= 1 (1 means balanced), got {imbalance_factor}.")
  if num_classes < 1:
    raise errors.InputError(f"num_classes must be >= 1, got {num_classes}.")
  if n_max < 1:
    raise errors.InputError(f"n_max must be >= 1, got {n_max}.")
  if profile == "exp":
    if num_classes == 1:
      return np.array([n_max], dtype=np.int64)
    c = np.arange(num_classes, dtype=np.float64)
    # Computed in float64 exactly as the published CIFAR-LT code does, then floored.
    counts = [int(n_max * imbalance_factor**(-ci / (num_classes - 1))) for ci in c]
    return np.asarray(counts, dtype=np.int64)
  if profile == "step":
    half = num_classes // 2
    counts = np.full(num_classes, n_max, dtype=np.int64)
    counts[num_classes - half:] = int(n_max / imbalance_factor)
    return counts
  raise errors.InputError(f"Unknown imbalance profile {profile!r}; accepted: {PROFILES}.")


@dataclasses.dataclass(frozen=True)
class Split:
  """Indices into a labelled pool.

  Attributes:
    train: indices of the long-tailed training subset, [sum(counts)] int64, grouped by class.
    validation: balanced validation indices, [C * validation_per_class].
    holdout: balanced local-test indices, [C * holdout_per_class] (empty unless `holdout:K`).
    counts: [C] training images per class actually kept.
    target_counts: [C] the profile's counts for n_max (what `counts` would be with no validation
      taken out of the training images).
  """
  train: np.ndarray
  validation: np.ndarray
  holdout: np.ndarray
  counts: np.ndarray
  target_counts: np.ndarray


def split_pool(labels: np.ndarray, num_classes: int, imbalance_factor: float, *,
               profile: str = "exp", validation_per_class: int = 0,
               holdout_per_class: int = 0, n_max: int = 0, seed: int = 0,
               validation_from: str = "pool") -> Split:
  """Deterministically splits a labelled pool into LT-train, validation and holdout indices.

  Within each class one seeded permutation orders the images and the first `holdout_per_class`
  go to the local test split. `pool`: the next `validation_per_class` go to validation, n_max is
  what then remains in the smallest class, and the long-tailed subset takes the first n_c of the
  rest. `leftover`: n_max is what remains after the holdout alone, validation takes the last
  `validation_per_class` images of the class (the same ones whatever the imbalance factor) and
  the subset the first min(n_c, remaining - validation_per_class). The permutation depends only
  on (seed, class), so the same config gives the same indices on every machine.

  Args:
    labels: [N] int labels of the pool.
    num_classes: C.
    imbalance_factor: IF >= 1.
    profile: `exp` or `step`.
    validation_per_class: images per class set aside for validation.
    holdout_per_class: images per class set aside as a local balanced test split.
    n_max: images of the largest class; 0 means all that the smallest class pool allows.
    seed: config seed.
    validation_from: `pool` or `leftover` (above).

  Returns:
    A `Split`.
  """
  if validation_from not in VALIDATION_FROM:
    raise errors.InputError(f"data.validation_from={validation_from!r}: accepted "
                            f"{', '.join(VALIDATION_FROM)}.")
  labels = np.asarray(labels)
  per_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
  available = np.array([len(p) for p in per_class]) - validation_per_class - holdout_per_class
  if available.min() < 1:
    worst = int(np.argmin(available))
    raise errors.InputError(
        f"Class {worst} has {len(per_class[worst])} images, fewer than validation_per_class="
        f"{validation_per_class} + holdout={holdout_per_class} + 1. Lower data.validation_per_class or "
        "the holdout K.")
  leftover = validation_from == "leftover"
  cap = int(available.min()) + (validation_per_class if leftover else 0)
  if n_max <= 0:
    n_max = cap
  elif n_max > cap:
    raise errors.InputError(f"data.n_max={n_max} but only {cap} images remain in the smallest class after "
                     "validation/holdout; lower data.n_max (0 uses what remains).")
  target = longtail_counts(n_max, num_classes, imbalance_factor, profile)
  train, val, hold = [], [], []
  for c, idx in enumerate(per_class):
    rng = np.random.default_rng([seed, c])
    order = idx[rng.permutation(len(idx))]
    hold.append(order[:holdout_per_class])
    rest = order[holdout_per_class:]
    if leftover:
      val.append(rest[len(rest) - validation_per_class:])
      train.append(rest[:min(target[c], len(rest) - validation_per_class)])
    else:
      val.append(rest[:validation_per_class])
      train.append(rest[validation_per_class:validation_per_class + target[c]])
  cat = lambda xs: np.concatenate(xs).astype(np.int64)
  counts = np.asarray([len(t) for t in train], np.int64)
  return Split(train=cat(train), validation=cat(val), holdout=cat(hold), counts=counts,
               target_counts=target)


def shot_groups(counts: np.ndarray, rule: str = "thirds") -> dict[str, np.ndarray]:
  """Which classes are many-, medium- and few-shot.

  Args:
    counts: [C] training images per class.
    rule: `thirds` (CIFAR: classes sorted by count, cut into three near-equal parts) or
      `thresholds` (ImageNet-LT: >100, 20..100, <20 images).

  Returns:
    {"many": class ids, "medium": class ids, "few": class ids}.
  """
  counts = np.asarray(counts)
  if rule == "thirds":
    order = np.argsort(-counts, kind="stable")
    many, medium, few = np.array_split(order, 3)
    return {"many": np.sort(many), "medium": np.sort(medium), "few": np.sort(few)}
  if rule == "thresholds":
    return {"many": np.flatnonzero(counts > 100),
            "medium": np.flatnonzero((counts >= 20) & (counts <= 100)),
            "few": np.flatnonzero(counts < 20)}
  raise errors.InputError(f"Unknown shot rule {rule!r}; accepted: 'thirds', 'thresholds'.")
