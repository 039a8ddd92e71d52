"""The two-stage classifier (DESIGN §6): which group, then which class inside the group.

A group network (backbone + a linear head over groups, trained with group labels) and one
within-group network per group (backbone + a head over the group's classes, trained on the group's
images only). Prediction `soft`: p(c) = p(g(c)) * p(c | g(c)); `hard`: the argmax group, then the
argmax class inside it. Every network trains with the evaluation protocol; the label projections
here are shared with the hierarchical distillation plugin.
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
      (`grouping.stage1_*`); one trained on a distilled set trains as the protocol does.
    rectify: `+rectify`: soft group targets and each group's soft within-group targets are
      rectified in their own label space (prior: the training images per group, per class of the
      group), with `tau` when given (the validated one) or as `rectify.mode` chooses.
    class_counts: [C] training images per class (the priors of `rectify`).
    tau: the strength every stage takes (None: chosen per stage).
  """
  grouping: grouping_lib.Grouping
  prediction: str = "soft"
  stage1: training.Balance = training.Balance("class_balanced", "ce", "dataset")
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


def evaluate_two_stage(protocol: protocol_lib.Protocol, spec: TwoStageSpec,
                       train_set: protocol_lib.LabelledSet, held_out: protocol_lib.HeldOut, mesh,
                       checkpoint_dir: pathlib.Path | None = None) -> dict:
  """Trains T group networks and T within-group networks per group on one labelled set and tests
  the two-stage prediction on `held_out`. Returns the usual report fields plus group_acc and
  within_group_acc (accuracy of the within-group networks on the images of their group), both in
  percent.

  `train_set.labels` [N] (the class each image stands for: a synthetic set's assigned classes)
  decides which group's networks train on an image; `train_set.targets` ([N] ints or [N, C] soft
  labels) are what they fit. Learned soft labels can put most mass on another class (DATM at IF 100,
  IPC 1), so their argmax must not stand in for `labels`.

  `train_set.learned_lrs` (a hierarchical set's lr per objective: `groups`, `group_<g>`) gives each
  network its own lr; networks it does not name train with `train_set.lr`. A group network trained
  on real images (`train_set.real`: the random, herding and full baselines) counters the
  between-group imbalance as `spec.stage1` says. Group g's within-group networks draw from the seed
  `seeds.WITHIN_GROUP_NETWORKS + g` streams further. With `checkpoint_dir`, each training resumes
  from `<checkpoint_dir>/groups` or `<checkpoint_dir>/group_<g>`."""
  grouping = spec.grouping
  learned_lrs, lr, method = train_set.learned_lrs, train_set.lr, train_set.method
  balance = spec.stage1 if train_set.real else training.Balance()
  start = time.time()
  eval_images, eval_labels = held_out.images, held_out.labels
  backbone = models.make_backbone(protocol.model)
  labels = np.asarray(train_set.labels)
  group_model = models.Classifier(backbone, models.make_head(protocol.model, grouping.num_groups))
  rectified = {}
  targets = spec.rectified(group_targets(train_set.targets, grouping), grouping.group_of[labels],
                           grouping.groups, rectified, "groups")
  group_set = dataclasses.replace(train_set, targets=targets, lr=learned_lrs.get("groups", lr))
  group_params = protocol_lib.train_networks(
      protocol, group_model, group_set, mesh, balance=balance,
      checkpoint_dir=protocol_lib.subfolder(checkpoint_dir, "groups"),
      label=f"evaluate {method} groups")
  group_probs = _probs(protocol, group_model, group_params, eval_images)  # [T, N, G]
  within, within_correct = [], []
  true_group = grouping.group_of[eval_labels]
  for g, classes in enumerate(grouping.groups):
    n_test = (true_group == g).sum()
    if len(classes) == 1:  # One class: p(c | g) = 1, nothing to train.
      within.append(np.ones((*group_probs.shape[:2], 1)))
      within_correct.append(np.ones((group_probs.shape[0], n_test), bool))
      continue
    index = np.flatnonzero(np.isin(labels, classes))
    if len(index) == 0:
      raise errors.InputError(f"Group {g} (classes {classes}) has no images in the evaluated set.")
    model = models.Classifier(backbone, models.make_head(protocol.model, len(classes)))
    targets = spec.rectified(within_targets(train_set.targets, grouping, g, index),
                             grouping.within_label_map(g)[labels[index]],
                             [(c,) for c in classes], rectified, f"group_{g}")
    members = train_set.subset(index, targets, learned_lrs.get(f"group_{g}", lr))
    group_protocol = dataclasses.replace(
        protocol, seed=seeds.offset(protocol.seed, seeds.WITHIN_GROUP_NETWORKS + g))
    params = protocol_lib.train_networks(
        group_protocol, model, members, mesh,
        checkpoint_dir=protocol_lib.subfolder(checkpoint_dir, f"group_{g}"),
        label=f"evaluate {method} group {g}")
    probs = _probs(protocol, model, params, eval_images)
    within.append(probs)
    local = grouping.within_label_map(g)[eval_labels[true_group == g]]
    within_correct.append(probs[:, true_group == g].argmax(-1) == local[None])
  scores = combine(group_probs, within, grouping, spec.prediction)
  figures = metrics.classification_metrics(scores.argmax(-1), eval_labels, held_out.counts,
                                           protocol.shot_rule)
  figures["group_acc"] = float(100 * (group_probs.argmax(-1) == true_group[None]).mean())
  figures["within_group_acc"] = float(100 * np.concatenate(within_correct, axis=1).mean())
  return report_lib.assemble_report(
      train_set, held_out, {protocol.model.name: figures}, protocol.num_models, start,
      classifier=f"two_stage_{spec.prediction}", grouping=grouping.to_dict(),
      **({"learned_lrs": learned_lrs} if learned_lrs else {}),
      **({"rectify_stages": rectified} if rectified else {}))
