"""The two-stage classifier (DESIGN §6): which group, then which class inside the group.

Two architectures (`two_stage.arch`):
- `separate`: a group network (backbone + a linear head over groups, trained with group labels)
  and one within-group network per group (backbone + a head over the group's classes, trained on
  the group's images only).
- `shared`: one network, a backbone every image trains and separate linear heads (`MultiHead`):
  a group head over G groups and one within-group head per group. Its loss is the group
  cross-entropy plus each image's within-group cross-entropy under its own group's head only, so
  a head gets no gradient from other groups' images.
Prediction `soft`: p(c) = p(g(c)) * p(c | g(c)); `hard`: the argmax group, then the argmax class
inside it. Every network trains with the evaluation protocol; the label projections here are
shared with the hierarchical distillation plugin.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

import jax
import numpy as np

from ltdd_jax import errors, models, seeds
from ltdd_jax.core import training
from ltdd_jax.evaluation import metrics, protocol as protocol_lib, report as report_lib
from ltdd_jax.methods import grouping as grouping_lib
from ltdd_jax.methods import rectify as rectify_lib


def group_targets(targets: np.ndarray, grouping: grouping_lib.Grouping) -> np.ndarray:
  """Class targets ([N] ints or [N, C] probabilities) -> group targets ([N] or [N, G])."""
  targets = np.asarray(targets)
  if targets.ndim == 1:
    return grouping.group_of[targets]
  onehot = np.eye(grouping.num_groups, dtype=np.float32)[grouping.group_of]  # [C, G]
  return targets @ onehot


def within_targets(targets: np.ndarray, grouping: grouping_lib.Grouping, group: int,
                   index: np.ndarray) -> np.ndarray:
  """Targets of the images `index` (all of the group) as within-group labels / renormalised probs."""
  targets = np.asarray(targets)[index]
  if targets.ndim == 1:
    return grouping.within_label_map(group)[targets]
  local = targets[:, list(grouping.groups[group])]
  return local / np.maximum(local.sum(-1, keepdims=True), 1e-12)


ARCHS = ("separate", "shared")


def pack_targets(group: np.ndarray, within: list[tuple[np.ndarray, np.ndarray]],
                 grouping: grouping_lib.Grouping) -> np.ndarray:
  """The `shared` network's targets [N, G + C]: the group targets, then each group's head's
  slice (its classes, in group order), holding an image's within-group targets in its own
  group's slice and zeros in the others (no loss there: `training.segmented_cross_entropy`).

  Args:
    group: [N] group ids or [N, G] group probabilities.
    within: per group, (index [M_g] of its images, their targets [M_g] within-group ids or
      [M_g, size_g] probabilities).
    grouping: the class groups.
  """
  group = np.asarray(group)
  if group.ndim == 1:
    group = np.eye(grouping.num_groups, dtype=np.float32)[group]
  parts = [group.astype(np.float32)]
  for (index, targets), classes in zip(within, grouping.groups):
    part = np.zeros((len(group), len(classes)), np.float32)
    targets = np.asarray(targets)
    part[index] = np.eye(len(classes), dtype=np.float32)[targets] if targets.ndim == 1 else targets
    parts.append(part)
  return np.concatenate(parts, axis=-1)


def split_probs(logits: np.ndarray, sizes: tuple[int, ...]) -> list[np.ndarray]:
  """Per-head softmax of concatenated heads' logits [..., sum(sizes)] -> [..., size_i] each."""
  bounds = np.cumsum((0, *sizes))
  return [np.asarray(jax.nn.softmax(logits[..., a:b], axis=-1))
          for a, b in zip(bounds[:-1], bounds[1:])]


def combine(group_probs: np.ndarray, within_probs: list[np.ndarray],
            grouping: grouping_lib.Grouping, mode: str) -> np.ndarray:
  """Class scores [..., C] from p(group) [..., G] and p(class | group) per group [..., size_g].

  `soft`: p(g(c)) * p(c | g(c)). `hard`: p(c | g) inside the argmax group, 0 elsewhere (so the
  argmax is the hard two-stage decision).
  """
  shape = group_probs.shape[:-1]
  scores = np.zeros((*shape, grouping.num_classes), np.float64)
  if mode == "soft":
    for g, classes in enumerate(grouping.groups):
      scores[..., list(classes)] = group_probs[..., g:g + 1] * within_probs[g]
    return scores
  if mode == "hard":
    chosen = group_probs.argmax(-1)
    for g, classes in enumerate(grouping.groups):
      scores[..., list(classes)] = np.where((chosen == g)[..., None], within_probs[g], 0.0)
    return scores
  raise errors.InputError(f"grouping.prediction must be 'soft' or 'hard', got {mode!r}.")


@dataclasses.dataclass(frozen=True)
class TwoStageSpec:
  """The two-stage classifier of a grouping.

  Attributes:
    grouping: the class groups.
    prediction: `soft` (p(g(c)) p(c | g(c))) or `hard` (argmax group, then argmax class in it).
    stage1: how a group network trained on real images counters the between-group imbalance
      (`grouping.stage1_*`); one trained on a distilled set trains as the protocol does. The
      `shared` network draws every batch so (its within-group heads see the same draws).
    arch: `separate` networks per stage or one `shared` backbone with a head per stage.
    rectify: `+rectify`: soft group targets and each group's soft within-group targets are
      rectified in their own label space (prior: the training images per group, per class of the
      group), with `tau` when given (the validated one) or as `rectify.mode` chooses.
    class_counts: [C] training images per class (the priors of `rectify`).
    tau: the strength every stage takes (None: chosen per stage).
  """
  grouping: grouping_lib.Grouping
  prediction: str = "soft"
  stage1: training.Balance = training.Balance("class_balanced", "ce", "dataset")
  arch: str = "separate"
  rectify: rectify_lib.RectifySpec | None = None
  class_counts: tuple[int, ...] = ()
  tau: float | None = None

  def rectified(self, targets: np.ndarray, labels: np.ndarray, classes,
                records: dict, name: str) -> np.ndarray:
    """Soft `targets` [N, K] of the label space made of `classes` (K lists of class ids: a group
    each, or one class each), rectified when `rectify` is set (the record under `name`)."""
    if self.rectify is None or np.asarray(targets).ndim == 1:
      return targets
    counts = np.asarray([sum(self.class_counts[c] for c in members) for members in classes])
    out, record = rectify_lib.rectify(rectify_lib.as_log_probs(targets), labels, counts,
                                      self.rectify, self.tau, probs=targets)
    records[name] = record.record()
    return out


def _probs(protocol: protocol_lib.Protocol, model, params, images) -> np.ndarray:
  return np.asarray(jax.nn.softmax(protocol.logits(model, params, images), axis=-1))


def stage1_draws(spec: TwoStageSpec, train_set: protocol_lib.LabelledSet
                 ) -> tuple[training.Balance, np.ndarray | None]:
  """How the network fitting the group targets draws its images, and the strata its draws
  balance: a distilled set as the protocol does (by instance); a real one as `spec.stage1` says
  (class_balanced: every group equally often; by_class: every class)."""
  if not train_set.real:
    return training.Balance(), None
  grouping, labels = spec.grouping, np.asarray(train_set.labels)
  if spec.stage1.sampling == "class_balanced":
    return (dataclasses.replace(spec.stage1, num_strata=grouping.num_groups),
            grouping.group_of[labels])
  return training.over_classes(spec.stage1, labels, grouping.num_classes)


def stage_targets(spec: TwoStageSpec, train_set: protocol_lib.LabelledSet, records: dict
                  ) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
  """What each stage fits: the group targets ([N] or [N, G]) and, per group, (index of its images
  [M_g], their within-group targets [M_g] or [M_g, size_g]); soft ones rectified in their own
  label space when `spec.rectify` is set (records under `groups`, `group_<g>`)."""
  grouping, labels = spec.grouping, np.asarray(train_set.labels)
  group = spec.rectified(group_targets(train_set.targets, grouping), grouping.group_of[labels],
                         grouping.groups, records, "groups")
  within = []
  for g, classes in enumerate(grouping.groups):
    index = np.flatnonzero(np.isin(labels, classes))
    if len(classes) == 1:  # One class: p(c | g) = 1, nothing to learn.
      within.append((index, np.zeros(len(index), np.int32)))
      continue
    if len(index) == 0:
      raise errors.InputError(f"Group {g} (classes {classes}) has no images in the evaluated set.")
    within.append((index, spec.rectified(within_targets(train_set.targets, grouping, g, index),
                                         grouping.within_label_map(g)[labels[index]],
                                         [(c,) for c in classes], records, f"group_{g}")))
  return group, within


def _train_separate(protocol, spec, train_set, group, within, mesh, checkpoint_dir, eval_images):
  """p(group) [T, M, G] and p(class | group) per group [T, M, size_g] of separate networks."""
  grouping, learned_lrs, lr = spec.grouping, train_set.learned_lrs, train_set.lr
  backbone = models.make_backbone(protocol.model)
  group_model = models.Classifier(backbone, models.make_head(protocol.model, grouping.num_groups))
  balance, strata = stage1_draws(spec, train_set)
  group_set = dataclasses.replace(train_set, targets=group, lr=learned_lrs.get("groups", lr))
  group_params = protocol_lib.train_networks(
      protocol, group_model, group_set, mesh, balance=balance, strata=strata,
      checkpoint_dir=protocol_lib.subfolder(checkpoint_dir, "groups"),
      label=f"evaluate {train_set.method} groups")
  group_probs = _probs(protocol, group_model, group_params, eval_images)  # [T, M, G]
  within_probs = []
  for g, ((index, targets), classes) in enumerate(zip(within, grouping.groups)):
    if len(classes) == 1:
      within_probs.append(np.ones((*group_probs.shape[:2], 1)))
      continue
    model = models.Classifier(backbone, models.make_head(protocol.model, len(classes)))
    members = train_set.subset(index, targets, learned_lrs.get(f"group_{g}", lr))
    group_protocol = dataclasses.replace(
        protocol, seed=seeds.offset(protocol.seed, seeds.WITHIN_GROUP_NETWORKS + g))
    params = protocol_lib.train_networks(
        group_protocol, model, members, mesh,
        checkpoint_dir=protocol_lib.subfolder(checkpoint_dir, f"group_{g}"),
        label=f"evaluate {train_set.method} group {g}")
    within_probs.append(_probs(protocol, model, params, eval_images))
  return group_probs, within_probs


def _train_shared(protocol, spec, train_set, group, within, mesh, checkpoint_dir, eval_images):
  """p(group) [T, M, G] and p(class | group) per group [T, M, size_g] of one shared network
  (trained with the set's lr: the flat one of a set with an lr per objective)."""
  grouping = spec.grouping
  sizes = (grouping.num_groups, *grouping.group_sizes)
  model = models.Classifier(models.make_backbone(protocol.model),
                            models.make_multi_head(protocol.model, sizes))
  balance, strata = stage1_draws(spec, train_set)
  shared_set = dataclasses.replace(train_set, targets=pack_targets(group, within, grouping))
  params = protocol_lib.train_networks(
      protocol, model, shared_set, mesh, balance=balance, strata=strata,
      checkpoint_dir=protocol_lib.subfolder(checkpoint_dir, "shared"),
      label=f"evaluate {train_set.method} shared")
  probs = split_probs(protocol.logits(model, params, eval_images), sizes)
  return probs[0], probs[1:]


def evaluate_two_stage(protocol: protocol_lib.Protocol, spec: TwoStageSpec,
                       train_set: protocol_lib.LabelledSet, held_out: protocol_lib.HeldOut, mesh,
                       checkpoint_dir: pathlib.Path | None = None) -> dict:
  """Trains the two-stage classifier (`spec.arch`) T times on one labelled set and tests its
  prediction on `held_out`. Returns the usual report fields plus group_acc and within_group_acc
  (accuracy of the within-group stage on the images of each group), both in percent.

  `train_set.labels` [N] (the class each image stands for: a synthetic set's assigned classes)
  decides which group's stage trains on an image; `train_set.targets` ([N] ints or [N, C] soft
  labels) are what it fits. Learned soft labels can put most mass on another class (DATM at
  IF 100, IPC 1), so their argmax must not stand in for `labels`.

  `separate`: `train_set.learned_lrs` (a hierarchical set's lr per objective: `groups`,
  `group_<g>`) gives each network its own lr; networks it does not name train with
  `train_set.lr`. Group g's within-group networks draw from the seed
  `seeds.WITHIN_GROUP_NETWORKS + g` streams further. `shared`: one network per run with
  `train_set.lr`. A group stage trained on real images (`train_set.real`: the random, herding
  and full baselines) counters the between-group imbalance as `spec.stage1` says. With
  `checkpoint_dir`, each training resumes from `<checkpoint_dir>/groups`, `<checkpoint_dir>/group_<g>`
  or `<checkpoint_dir>/shared`."""
  if spec.arch not in ARCHS:
    raise errors.InputError(f"two_stage.arch must be one of {ARCHS}, got {spec.arch!r}.")
  grouping = spec.grouping
  start = time.time()
  eval_images, eval_labels = held_out.images, held_out.labels
  rectified = {}
  group, within = stage_targets(spec, train_set, rectified)
  trainer = _train_shared if spec.arch == "shared" else _train_separate
  group_probs, within_probs = trainer(protocol, spec, train_set, group, within, mesh,
                                      checkpoint_dir, eval_images)
  true_group = grouping.group_of[eval_labels]
  within_correct = []
  for g, probs in enumerate(within_probs):
    local = grouping.within_label_map(g)[eval_labels[true_group == g]]
    within_correct.append(probs[:, true_group == g].argmax(-1) == local[None])
  scores = combine(group_probs, within_probs, grouping, spec.prediction)
  figures = metrics.classification_metrics(scores.argmax(-1), eval_labels, held_out.counts,
                                           protocol.shot_rule)
  figures["group_acc"] = float(100 * (group_probs.argmax(-1) == true_group[None]).mean())
  figures["within_group_acc"] = float(100 * np.concatenate(within_correct, axis=1).mean())
  return report_lib.assemble_report(
      train_set, held_out, {protocol.model.name: figures}, protocol.num_models, start,
      classifier=f"two_stage_{spec.prediction}", two_stage_arch=spec.arch,
      grouping=grouping.to_dict(),
      **({"learned_lrs": train_set.learned_lrs} if train_set.learned_lrs else {}),
      **({"rectify_stages": rectified} if rectified else {}))
