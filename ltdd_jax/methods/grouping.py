"""Class groups for the grouping hypothesis (DESIGN §6): frequency, similarity or manual.

A `Grouping` is a partition of the classes; it maps class -> (group, index inside the group) and
back, and is saved with every run that uses it (`grouping.json`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

import numpy as np

from ltdd_jax import errors

STRATEGIES = ("frequency", "similarity", "manual")


@dataclasses.dataclass(frozen=True)
class GroupingSpec:
  """How classes are grouped (`config.grouping`'s partition keys).

  Attributes:
    strategy: `frequency`, `similarity` or `manual`.
    max_imbalance: frequency: a group grows while its max/min count stays at most this.
    num_groups: > 0: exactly this many groups (frequency and similarity).
    manual: the groups of `manual`, e.g. ((0, 1), (2, 3, 4)).
    min_group_size: similarity: smaller clusters merge into their nearest neighbour.
  """
  strategy: str = "frequency"
  max_imbalance: float = 5.0
  num_groups: int = 0
  manual: tuple = ()
  min_group_size: int = 2


@dataclasses.dataclass(frozen=True)
class Grouping:
  """A partition of C classes into G groups.

  Attributes:
    groups: G tuples of class ids; inside a group, classes keep the order given (frequency: by
      decreasing count), which defines their within-group index.
    num_classes: C.
  """
  groups: tuple[tuple[int, ...], ...]
  num_classes: int

  def __post_init__(self):
    flat = [c for g in self.groups for c in g]
    if sorted(flat) != list(range(self.num_classes)):
      raise errors.InputError(f"Groups {self.groups} must partition the classes 0..{self.num_classes - 1} "
                       "(each class in exactly one group).")
    if any(len(g) == 0 for g in self.groups):
      raise errors.InputError(f"Groups {self.groups} contain an empty group.")

  @property
  def num_groups(self) -> int:
    return len(self.groups)

  @property
  def group_sizes(self) -> tuple[int, ...]:
    return tuple(len(g) for g in self.groups)

  @property
  def group_of(self) -> np.ndarray:
    """[C] group id of every class."""
    out = np.empty(self.num_classes, np.int32)
    for g, classes in enumerate(self.groups):
      out[list(classes)] = g
    return out

  def within_label_map(self, group: int) -> np.ndarray:
    """[C] within-group label of the group's classes, -1 for every other class."""
    out = np.full(self.num_classes, -1, np.int32)
    out[list(self.groups[group])] = np.arange(len(self.groups[group]))
    return out

  def fingerprint(self) -> str:
    """A short stable id of the partition (names the folders of its experts)."""
    return hashlib.sha1(json.dumps(self.to_dict()).encode()).hexdigest()[:8]

  def to_dict(self) -> dict:
    return {"groups": [list(g) for g in self.groups], "num_classes": self.num_classes}

  def save(self, path) -> None:
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

  @classmethod
  def load(cls, path) -> "Grouping":
    d = json.loads(pathlib.Path(path).read_text())
    return cls(tuple(tuple(g) for g in d["groups"]), d["num_classes"])


def frequency_grouping(counts: np.ndarray, max_imbalance: float,
                       num_groups: int = 0) -> Grouping:
  """Contiguous groups of the classes sorted by decreasing count.

  With `num_groups` > 0: exactly that many groups, cut where the log-count range is split evenly
  (each group spans about the same imbalance). Otherwise greedy: a group grows while its
  max/min count stays <= `max_imbalance`.
  """
  counts = np.asarray(counts)
  order = [int(c) for c in np.argsort(-counts, kind="stable")]
  if num_groups > 0:
    if num_groups > len(order):
      raise errors.InputError(f"grouping.num_groups={num_groups} exceeds the {len(order)} classes.")
    logs = np.log(counts[order].astype(np.float64))
    edges = np.linspace(logs[0], logs[-1], num_groups + 1)[1:-1]
    cuts = [int(np.searchsorted(-logs, -e, side="right")) for e in edges]
    # Keep every group non-empty: cuts strictly increasing inside (0, C).
    fixed = []
    for i, cut in enumerate(cuts):
      lo = (fixed[-1] if fixed else 0) + 1
      hi = len(order) - (num_groups - 1 - i)
      fixed.append(min(max(cut, lo), hi))
    bounds = [0, *fixed, len(order)]
    return Grouping(tuple(tuple(order[a:b]) for a, b in zip(bounds[:-1], bounds[1:])), len(order))
  if max_imbalance < 1:
    raise errors.InputError(f"grouping.max_imbalance must be >= 1, got {max_imbalance}.")
  groups, current = [], [order[0]]
  for c in order[1:]:
    if counts[current[0]] / max(counts[c], 1) <= max_imbalance:
      current.append(c)
    else:
      groups.append(tuple(current))
      current = [c]
  groups.append(tuple(current))
  return Grouping(tuple(groups), len(order))


def similarity_grouping(class_features: np.ndarray, num_groups: int, min_group_size: int,
                        seed: int) -> Grouping:
  """Clusters L2-normalised class-mean features [C, F] with k-means; groups smaller than
  `min_group_size` are merged into the group with the nearest centroid. Deterministic for a seed."""
  from sklearn.cluster import KMeans  # pylint: disable=g-import-not-at-top
  feats = np.asarray(class_features, np.float64)
  feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
  num_classes = len(feats)
  if not 1 <= num_groups <= num_classes:
    raise errors.InputError(f"similarity grouping needs 1 <= num_groups <= {num_classes}, got {num_groups}.")
  assign = KMeans(num_groups, n_init=10, random_state=seed).fit_predict(feats)
  while True:
    labels, sizes = np.unique(assign, return_counts=True)
    small = labels[sizes < min_group_size]
    if len(small) == 0 or len(labels) == 1:
      break
    g = small[0]
    centroids = {l: feats[assign == l].mean(0) for l in labels if l != g}
    mine = feats[assign == g].mean(0)
    nearest = min(centroids, key=lambda l: np.linalg.norm(centroids[l] - mine))
    assign[assign == g] = nearest
  groups = [tuple(int(c) for c in np.flatnonzero(assign == l)) for l in np.unique(assign)]
  groups.sort(key=lambda g: g[0])
  return Grouping(tuple(groups), num_classes)


def manual_grouping(groups, num_classes: int) -> Grouping:
  """The partition given in `grouping.manual`."""
  if not groups:
    raise errors.InputError("grouping.strategy='manual' needs grouping.manual, e.g. ((0, 1, 2), (3, 4)).")
  return Grouping(tuple(tuple(int(c) for c in g) for g in groups), num_classes)


def within_imbalance(grouping: Grouping, counts) -> np.ndarray:
  """[G] each group's max / min training count: how imbalanced its per-group experts train (1 for
  a one-class group)."""
  counts = np.asarray(counts, np.float64)
  inside = [counts[list(g)] for g in grouping.groups]
  return np.array([c.max() / max(c.min(), 1.0) for c in inside])


def imbalanced_groups_note(grouping: Grouping, counts, max_imbalance: float) -> str | None:
  """A one-line note naming the groups whose classes are more than `max_imbalance` times
  imbalanced inside, or None. The hypothesis wants groups that are each close to balanced: a
  group that pairs a head and a tail class gives per-group experts that learn the same bias."""
  ratios = within_imbalance(grouping, counts)
  over = [f"{set(g)} {r:.0f}x" for g, r in zip(grouping.groups, ratios) if r > max_imbalance]
  if not over:
    return None
  return (f"groups {', '.join(over)} are more imbalanced inside than grouping.max_imbalance "
          f"({max_imbalance:g}): their per-group experts train on that imbalance, which "
          "hierarchical distillation means to remove; frequency groups keep every group within it "
          "(--config.grouping.strategy=frequency --config.grouping.num_groups=0).")


def make_grouping(spec: GroupingSpec, counts: np.ndarray, seed: int,
                  class_features: np.ndarray | None = None) -> Grouping:
  """The grouping a spec asks for. `similarity` needs class-mean features [C, F] of an expert."""
  strategy = spec.strategy
  if strategy == "frequency":
    return frequency_grouping(counts, spec.max_imbalance, spec.num_groups)
  if strategy == "manual":
    return manual_grouping(spec.manual, len(counts))
  if strategy == "similarity":
    if class_features is None:
      raise errors.InputError("similarity grouping needs class-mean features from a trained expert.")
    num_groups = spec.num_groups or frequency_grouping(counts, spec.max_imbalance).num_groups
    return similarity_grouping(class_features, num_groups, spec.min_group_size, seed)
  raise errors.InputError(f"Unknown grouping.strategy {strategy!r}; accepted: {STRATEGIES}.")
