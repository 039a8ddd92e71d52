"""The two-stage hierarchical distillation plugin (DESIGN §6).

The same C x IPC synthetic images are matched against group experts with group labels (stage 1)
and against each group's own experts with within-group labels on that group's images (stage 2):
loss = lambda_1 * L_1 + lambda_2 * sum_g L_2(g). It only says which expert sets to train
(`expert_requests`) and which objectives to match (`sources`), so it wraps any matching method
(MTT, DATM-style, LTDD-style options); its sets are evaluated with the two-stage classifier.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from ltdd_jax import errors
from ltdd_jax.core import matching, training
from ltdd_jax.methods import distill
from ltdd_jax.methods import experts as experts_lib
from ltdd_jax.methods import grouping as grouping_lib


@dataclasses.dataclass(frozen=True)
class HierarchicalSpec:
  """The plugin's settings (`config.grouping`) and what it needs of the run.

  Attributes:
    lambda_1, lambda_2: the stage-1 and stage-2 weights.
    stage1: how the group experts counter the between-group imbalance (`stage1_balance`).
    step_matched_unroll: each group's student unrolls in proportion to its experts' steps per
      epoch (`matched_syn_steps`).
    ed: the base method uses LTDD's ED ...
    ed_min_imbalance: ... on objectives whose experts drew classes at least this imbalanced.
    experts: how experts train (steps per epoch, default sampling).
    ipc: images per class of the synthetic set (which images are a group's).
  """
  lambda_1: float
  lambda_2: float
  stage1: training.Balance
  experts: experts_lib.ExpertSpec
  ipc: int
  step_matched_unroll: bool = True
  ed: bool = False
  ed_min_imbalance: float = 10.0


def stage1_balance(sampling: str, loss: str) -> training.Balance:
  """How stage-1 networks trained on real images counter the between-group imbalance (at IF 100
  the head group has ~80 times the tail group's images): `grouping.stage1_sampling` (class_balanced
  draws every group equally often; by_class every class equally often, so a group in proportion
  to its number of classes; instance by count) and `grouping.stage1_loss`. A group-balanced epoch draws as
  many images as the training set has, so group experts take as many SGD steps per epoch as flat
  experts that sample by instance (the default)."""
  return training.Balance(sampling=sampling, loss=loss, balanced_epoch="dataset")


def group_counts(grouping: grouping_lib.Grouping, counts: np.ndarray) -> np.ndarray:
  """[num_groups] training images per group."""
  return np.bincount(grouping.group_of, weights=counts, minlength=grouping.num_groups)


def decoupled(spec: HierarchicalSpec, counts: np.ndarray, sampling: str,
              classes_per_output: np.ndarray | None = None) -> bool:
  """Whether an objective whose experts drew classes with `counts` by `sampling` uses LTDD's ED.

  ED matches the backbone against the experts and the classifier against classifier experts
  re-trained class-balanced, which undo the classifier's imbalance bias. Where the experts' draws
  are nearly balanced (group-balanced stage 1, groups of at most `grouping.max_imbalance`) the
  classifier experts barely move (at CIFAR-10-LT IF 100: 0.02-0.16 in two epochs against 0.60 for
  the flat experts) and the classifier term's normalised distance, divided by that small move,
  drives the objective's lr to collapse; those objectives match the whole network instead."""
  if not spec.ed:
    return False
  sampled = matching.sampled_class_counts(counts, sampling, classes_per_output)
  return sampled.max() >= spec.ed_min_imbalance * sampled.min()


def stage1_used(spec: HierarchicalSpec, grouping: grouping_lib.Grouping) -> bool:
  """Stage 1 is left out when lambda_1 is 0 or there is one group (a one-output network never
  moves)."""
  return spec.lambda_1 != 0 and grouping.num_groups > 1


@dataclasses.dataclass(frozen=True)
class ExpertRequest:
  """One expert set the plugin matches against.

  Attributes:
    name: `groups` (stage 1) or `group_<g>` (stage 2).
    folder: its folder under the grouping's expert root (`experts_root`).
    labelling: the classes and labels it learns.
    balance: its sampling / loss overrides.
    decoupled: it needs classifier experts too (`decoupled`).
  """
  name: str
  folder: str
  labelling: experts_lib.Labelling
  balance: training.Balance
  decoupled: bool


def experts_root(root, grouping: grouping_lib.Grouping) -> pathlib.Path:
  """Where a grouping's expert sets live: `<expert root>/grouping_<fingerprint>/`."""
  return pathlib.Path(root) / f"grouping_{grouping.fingerprint()}"


def expert_requests(spec: HierarchicalSpec, grouping: grouping_lib.Grouping, counts: np.ndarray,
                    stage1: bool = True) -> list[ExpertRequest]:
  """The group experts (when `stage1`; `groups_<sampling>_<loss>`) and every multi-class group's
  own experts (`group_<g>`: a one-class expert never moves, so there is nothing to match), with
  which of them need classifier experts."""
  requests = []
  if stage1:
    balance = spec.stage1
    requests.append(ExpertRequest(
        "groups", f"groups_{balance.sampling}_{balance.loss}",
        experts_lib.Labelling(grouping.num_groups, label_map=tuple(int(x) for x in grouping.group_of)),
        balance, decoupled(spec, group_counts(grouping, counts), balance.sampling,
                           np.asarray(grouping.group_sizes))))
  for g, classes in enumerate(grouping.groups):
    if len(classes) < 2:
      continue
    requests.append(ExpertRequest(
        f"group_{g}", f"group_{g}", experts_lib.Labelling(len(classes), tuple(int(c) for c in classes)),
        training.Balance(),
        decoupled(spec, np.asarray(counts)[list(classes)], spec.experts.sampling)))
  return requests


def matched_syn_steps(spec: HierarchicalSpec, syn_steps: int, counts: np.ndarray, classes) -> int:
  """The student's inner steps for a group whose experts train on `classes` only.

  An expert epoch of a group takes ceil(n_g / B) SGD steps, a flat one ceil(N / B): at IF 100 the
  tail group {8, 9} takes 1 where the flat experts take 38, so its `expert_epochs` window spans
  38 times fewer expert steps. Its student unrolls `syn_steps` in the same proportion (at least
  1), so that every objective matches a comparable number of expert steps per student step."""
  def steps(labels, num_classes):
    return experts_lib.train_spec(spec.experts, labels, num_classes).steps_per_epoch
  counts = np.asarray(counts)
  flat = steps(np.repeat(np.arange(len(counts)), counts), len(counts))
  group = steps(np.repeat(np.arange(len(classes)), counts[list(classes)]), len(classes))
  return max(1, int(round(syn_steps * group / flat)))


def sources(spec: HierarchicalSpec, grouping: grouping_lib.Grouping, counts: np.ndarray,
            expert_sets: dict, syn_steps: int) -> list[tuple[distill.ExpertSource, float, int | None]]:
  """The stage-1 and stage-2 objectives: (source, weight, its own syn_steps or None) each.

  Args:
    spec: the `HierarchicalSpec`.
    grouping: the class groups.
    counts: [C] training images per class.
    expert_sets: request name -> (expert set, classifier set or None), for `expert_requests`.
    syn_steps: the run's inner steps (stage 2 scales them with `step_matched_unroll`).

  Stage 1 is left out when `stage1_used` says so; stage 2 leaves out one-class groups and is
  left out entirely when lambda_2 is 0.
  """
  counts = np.asarray(counts)
  syn_labels = np.repeat(np.arange(len(counts)), spec.ipc)
  out = []
  if stage1_used(spec, grouping):
    group_set, group_cls = expert_sets["groups"]
    out.append((distill.ExpertSource(group_set, group_cls, grouping.group_of,
                                     group_counts(grouping, counts), spec.stage1.sampling,
                                     name="groups",
                                     classes_per_output=np.asarray(grouping.group_sizes)),
                spec.lambda_1, None))
  if spec.lambda_2 != 0:
    for g, classes in enumerate(grouping.groups):
      if f"group_{g}" not in expert_sets:
        continue
      within_set, within_cls = expert_sets[f"group_{g}"]
      classes = list(classes)
      index = np.flatnonzero(np.isin(syn_labels, classes))
      steps = (matched_syn_steps(spec, syn_steps, counts, classes) if spec.step_matched_unroll
               else None)
      out.append((distill.ExpertSource(within_set, within_cls, grouping.within_label_map(g),
                                       counts[classes], spec.experts.sampling, index,
                                       name=f"group_{g}"), spec.lambda_2, steps))
  if not out:
    raise errors.InputError("Hierarchical distillation has nothing to match: set grouping.lambda_1 "
                            "or grouping.lambda_2 above 0 (and use groups of at least two classes).")
  return out
