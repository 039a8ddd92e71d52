"""The matching methods and the option groups each turns on (DESIGN §4).

`mtt` matches images and lr; `datm` adds soft labels from expert logits and a growing start-epoch
window; `ltdd` adds, to DATM's soft labels, the class-frequency-weighted inner loss (DAM) and the
backbone / classifier decoupled matching against classifier-only experts (ED). Their
hyperparameters live in the config (`datm.*`, `ltdd.*`).
"""

from __future__ import annotations

import dataclasses

from ltdd_jax import errors

METHODS = ("mtt", "datm", "ltdd")


@dataclasses.dataclass(frozen=True)
class MethodOptions:
  """Which option groups a method turns on (their hyperparameters live in the config)."""
  soft_labels: bool
  grow_window: bool
  dam: bool
  ed: bool


def method_options(config) -> MethodOptions:
  """mtt: none; datm: soft labels + growing window; ltdd: soft labels, `ltdd.dam`, `ltdd.ed` and
  the growing window only when `ltdd.grow_window` (LTDD's IF-100 configs draw uniformly)."""
  method = config.method.split("+")[0]
  if method not in METHODS:
    raise errors.InputError(f"Unknown distillation method {method!r}; accepted: {METHODS}.")
  datm = method == "datm"
  ltdd = method == "ltdd"
  return MethodOptions(soft_labels=datm or ltdd,
                       grow_window=datm or (ltdd and config.ltdd.grow_window),
                       dam=ltdd and config.ltdd.dam, ed=ltdd and config.ltdd.ed)


@dataclasses.dataclass(frozen=True)
class EDSpec:
  """LTDD's expert decoupling: a backbone term against the experts and a classifier term against
  the classifier-only experts, loss = backbone_weight * L_backbone + classifier_weight * L_head.

  Attributes:
    backbone_weight, classifier_weight: the two terms' weights.
    max_start_epoch: classifier-stage start epochs are drawn from [0, max_start_epoch).
    dam: whether the DAM class weights also enter the classifier term's inner loss.
    freeze_backbone: the student trains its head alone during the classifier unroll.
  """
  backbone_weight: float = 1.0
  classifier_weight: float = 1.0
  max_start_epoch: int = 1
  dam: bool = False
  freeze_backbone: bool = True


def ed_spec(ltdd_config) -> EDSpec:
  """The `EDSpec` of `config.ltdd`."""
  return EDSpec(backbone_weight=ltdd_config.backbone_weight,
                classifier_weight=ltdd_config.classifier_weight,
                max_start_epoch=ltdd_config.classifier_max_start_epoch,
                dam=ltdd_config.classifier_dam,
                freeze_backbone=ltdd_config.classifier_freeze_backbone)
