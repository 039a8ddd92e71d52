"""The two-stage classifier and the two-stage hierarchical distillation plugin (DESIGN §6).

Two-stage classifier: a group network (backbone + a linear head over groups, trained with group labels) and one
within-group network per group (backbone + a head over the group's classes, trained on the group's
images only). Prediction `soft`: p(c) = p(g(c)) * p(c | g(c)); `hard`: the argmax group, then the
argmax class inside it.

Hierarchical distillation: the same C x IPC synthetic images are matched against group experts
with group labels (stage 1) and against each group's own experts with within-group labels on that
group's images (stage 2): loss = lambda_1 * L_1 + lambda_2 * sum_g L_2(g). It only builds
`MatchingObjective`s, so it wraps any method of `distill` (MTT, DATM-style, LTDD-style options).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

import jax
import numpy as np

from ltdd_jax import distill, errors, matching, methods, models
from ltdd_jax import evaluate as evaluate_lib
from ltdd_jax import experts as experts_lib
from ltdd_jax import grouping as grouping_lib

# ----------------------------------------------------------------------------------------------
# Label projections shared by the classifier and the distillation plugin.


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


# ----------------------------------------------------------------------------------------------
# The two-stage classifier.


@dataclasses.dataclass(frozen=True)
class TwoStageSpec:
  """How the two-stage classifier predicts and trains its group network.

  Attributes:
    prediction: `soft` (p(g(c)) p(c | g(c))) or `hard` (argmax group, then argmax class in it).
    stage1: how a group network trained on real images counters the between-group imbalance
      (`stage1_balance`); one trained on a distilled set trains as the protocol does.
  """
  prediction: str = "soft"
  stage1: experts_lib.Balance = experts_lib.Balance("class_balanced", "ce", "dataset")

  @classmethod
  def from_config(cls, grouping_config) -> "TwoStageSpec":
    """`grouping.prediction` and the stage-1 balance of `grouping.stage1_*`."""
    return cls(grouping_config.prediction, stage1_balance(grouping_config))


def _probs(protocol: evaluate_lib.Protocol, model, params, images) -> np.ndarray:
  return np.asarray(jax.nn.softmax(protocol.logits(model, params, images), axis=-1))


def evaluate_two_stage(protocol: evaluate_lib.Protocol, spec: TwoStageSpec, data,
                       grouping: grouping_lib.Grouping, train_set: evaluate_lib.LabelledSet, *,
                       seed: int, mesh, split: str = "test",
                       checkpoint_dir: pathlib.Path | None = None) -> dict:
  """Trains T group networks and T within-group networks per group on one labelled set and tests
  the two-stage prediction. Returns the usual report fields plus group_acc and within_group_acc
  (accuracy of the within-group networks on the images of their group), both in percent.

  `train_set.labels` [N] (the class each image stands for: a synthetic set's assigned classes)
  decides which group's networks train on an image; `train_set.targets` ([N] ints or [N, C] soft
  labels) are what they fit. Learned soft labels can put most mass on another class (DATM at IF 100,
  IPC 1), so their argmax must not stand in for `labels`.

  `train_set.learned_lrs` (a hierarchical set's lr per objective: `groups`, `group_<g>`) gives each
  network its own lr; networks it does not name train with `train_set.lr`. A group network trained
  on real images (the `random`, `herding` and `full` baselines) counters the between-group
  imbalance as `spec.stage1` says. With `checkpoint_dir`, each training resumes from
  `<checkpoint_dir>/groups` or `<checkpoint_dir>/group_<g>`."""
  learned_lrs, lr, method = train_set.learned_lrs, train_set.lr, train_set.method
  real = method.split("+")[0] in ("random", "herding", "full")
  balance = spec.stage1 if real else experts_lib.Balance()
  start = time.time()
  eval_images, eval_labels = evaluate_lib.split_arrays(data, split)
  backbone = models.make_backbone(protocol.model)
  labels = np.asarray(train_set.labels)
  group_model = models.Classifier(backbone, models.make_head(protocol.model, grouping.num_groups))
  group_set = dataclasses.replace(train_set, targets=group_targets(train_set.targets, grouping),
                                  lr=learned_lrs.get("groups", lr))
  group_params = evaluate_lib.train_networks(
      protocol, group_model, group_set, grouping.num_groups, seed, mesh,
      label=f"evaluate {method} groups", balance=balance,
      checkpoint_dir=evaluate_lib.subfolder(checkpoint_dir, "groups"))
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
    members = train_set.subset(index, within_targets(train_set.targets, grouping, g, index),
                               learned_lrs.get(f"group_{g}", lr))
    params = evaluate_lib.train_networks(
        protocol, model, members, len(classes), seed + 1 + g, mesh,
        label=f"evaluate {method} group {g}",
        checkpoint_dir=evaluate_lib.subfolder(checkpoint_dir, f"group_{g}"))
    probs = _probs(protocol, model, params, eval_images)
    within.append(probs)
    local = grouping.within_label_map(g)[eval_labels[true_group == g]]
    within_correct.append(probs[:, true_group == g].argmax(-1) == local[None])
  scores = combine(group_probs, within, grouping, spec.prediction)
  report = evaluate_lib.classification_metrics(scores.argmax(-1), eval_labels, data.counts,
                                               protocol.shot_rule)
  report["group_acc"] = float(100 * (group_probs.argmax(-1) == true_group[None]).mean())
  report["within_group_acc"] = float(100 * np.concatenate(within_correct, axis=1).mean())
  return evaluate_lib.assemble_report(
      protocol, data, {protocol.model.name: report}, train_set, split=split, start=start,
      classifier=f"two_stage_{spec.prediction}", grouping=grouping.to_dict(),
      **({"learned_lrs": learned_lrs} if learned_lrs else {}))


# ----------------------------------------------------------------------------------------------
# Two-stage hierarchical distillation.


def stage1_balance(grouping_config) -> experts_lib.Balance:
  """How stage-1 networks trained on real images counter the between-group imbalance (at IF 100
  the head group has ~80 times the tail group's images): `grouping.stage1_sampling` (class_balanced
  draws every group equally often) and `grouping.stage1_loss`. A group-balanced epoch draws as
  many images as the training set has, so group experts take as many SGD steps per epoch as flat
  experts that sample by instance (the default)."""
  return experts_lib.Balance(sampling=grouping_config.stage1_sampling,
                             loss=grouping_config.stage1_loss, balanced_epoch="dataset")


def group_counts(grouping: grouping_lib.Grouping, counts: np.ndarray) -> np.ndarray:
  """[num_groups] training images per group."""
  return np.bincount(grouping.group_of, weights=counts, minlength=grouping.num_groups)


def decoupled(config, counts: np.ndarray, sampling: str) -> bool:
  """Whether an objective whose experts drew classes with `counts` by `sampling` uses LTDD's ED.

  ED matches the backbone against the experts and the classifier against classifier experts
  re-trained class-balanced, which undo the classifier's imbalance bias. Where the experts' draws
  are nearly balanced (group-balanced stage 1, groups of at most `grouping.max_imbalance`) the
  classifier experts barely move (at CIFAR-10-LT IF 100: 0.02-0.16 in two epochs against 0.60 for
  the flat experts) and the classifier term's normalised distance, divided by that small move,
  drives the objective's lr to collapse; those objectives match the whole network instead."""
  if not methods.method_options(config).ed:
    return False
  sampled = matching.sampled_class_counts(counts, sampling)
  return sampled.max() >= config.grouping.ed_min_imbalance * sampled.min()


def group_expert_sets(config, data, grouping: grouping_lib.Grouping, root, mesh,
                      stage1: bool = True):
  """Trains (or opens) the group experts (when `stage1`) and every multi-class group's own experts
  under `root` (`grouping_<fingerprint>/groups`, `.../group_<g>`), and their classifier experts
  where the objective uses ED (`decoupled`).

  Returns:
    (group set or None, its classifier set or None, {g: (within set, classifier set or None)}).
  """
  root = pathlib.Path(root) / f"grouping_{grouping.fingerprint()}"
  group_set = group_cls = None
  if stage1:
    balance = stage1_balance(config.grouping)
    group_set = experts_lib.train_experts(
        config, data, root / f"groups_{balance.sampling}_{balance.loss}", mesh,
        label_map=grouping.group_of, balance=balance)
    if decoupled(config, group_counts(grouping, data.counts), balance.sampling):
      group_cls = experts_lib.classifier_experts(config, data, group_set, mesh)
  within = {}
  for g, classes in enumerate(grouping.groups):
    if len(classes) < 2:
      continue  # A one-class expert never moves: nothing to match.
    s = experts_lib.train_experts(config, data, root / f"group_{g}", mesh, classes=classes)
    ed = decoupled(config, data.counts[list(classes)], config.experts.sampling)
    within[g] = (s, experts_lib.classifier_experts(config, data, s, mesh) if ed else None)
  return group_set, group_cls, within


def matched_syn_steps(config, counts: np.ndarray, classes) -> int:
  """The student's inner steps for a group whose experts train on `classes` only.

  An expert epoch of a group takes ceil(n_g / B) SGD steps, a flat one ceil(N / B): at IF 100 the
  tail group {8, 9} takes 1 where the flat experts take 38, so its `expert_epochs` window spans
  38 times fewer expert steps. Its student unrolls syn_steps in the same proportion (at least 1),
  so that every objective matches a comparable number of expert steps per student step."""
  def steps(labels, num_classes):
    return experts_lib.expert_spec(config.experts, labels, num_classes).steps_per_epoch
  counts = np.asarray(counts)
  flat = steps(np.repeat(np.arange(len(counts)), counts), len(counts))
  group = steps(np.repeat(np.arange(len(classes)), counts[list(classes)]), len(classes))
  return max(1, int(round(config.distill.syn_steps * group / flat)))


def hierarchical_objectives(config, data, grouping: grouping_lib.Grouping, expert_root, mesh):
  """The stage-1 and stage-2 objectives and their weights (lambda_1, then lambda_2 per group).

  Stage 1 is left out when lambda_1 is 0 or there is one group (a one-output network never moves);
  stage 2 leaves out one-class groups and is left out entirely when lambda_2 is 0.
  """
  lambda_1, lambda_2 = config.grouping.lambda_1, config.grouping.lambda_2
  stage1 = lambda_1 != 0 and grouping.num_groups > 1
  group_set, group_cls, within = group_expert_sets(config, data, grouping, expert_root, mesh,
                                                   stage1)
  syn_labels = np.repeat(np.arange(data.num_classes), config.distill.ipc)

  objectives, weights = [], []
  if stage1:
    objectives.append(distill.make_objective(config, group_set, group_cls, grouping.group_of,
                                             grouping.num_groups,
                                             group_counts(grouping, data.counts),
                                             stage1_balance(config.grouping).sampling,
                                             name="groups"))
    weights.append(lambda_1)
  if lambda_2 != 0:
    for g, (s, cls_set) in within.items():
      classes = list(grouping.groups[g])
      index = np.flatnonzero(np.isin(syn_labels, classes))
      objective = distill.make_objective(config, s, cls_set, grouping.within_label_map(g),
                                         len(classes), data.counts[classes],
                                         config.experts.sampling, index, name=f"group_{g}")
      if config.grouping.step_matched_unroll:
        objective.syn_steps = matched_syn_steps(config, data.counts, classes)
      objectives.append(objective)
      weights.append(lambda_2)
  if not objectives:
    raise errors.InputError("Hierarchical distillation has nothing to match: set grouping.lambda_1 or "
                     "grouping.lambda_2 above 0 (and use groups of at least two classes).")
  return objectives, weights
