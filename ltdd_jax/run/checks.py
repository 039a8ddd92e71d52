"""Config checks that run before any work: a typo or an impossible combination fails in seconds.

`check_config` looks at the config alone (enumerated values, ranges, cross-key constraints);
`check_with_data` at what needs the loaded dataset (every class with training images once the
long-tailed subset is drawn, at least two classes, IPC against class sizes, manual groups against
the classes). `pipeline.setup` runs both before it writes `config.json` or trains anything. Each
problem names the key, its value and what is accepted; all problems are reported at once.
"""

from __future__ import annotations

import numpy as np
from absl import logging

from ltdd_jax import errors, models
from ltdd_jax.core import augment, ensemble, matching, training
from ltdd_jax.data import longtail, sources
from ltdd_jax.evaluation import protocol as protocol_lib
from ltdd_jax.methods import grouping, observer, rectify, registry, two_stage
from ltdd_jax.models import layers
from ltdd_jax.run import specs

SHOT_RULES = ("thirds", "thresholds")
INIT_MODES = ("real", "noise")
PREDICTIONS = ("soft", "hard")
EVALUATION_PROTOCOLS = ("fixed", "relabel")
RELABEL_RECIPES = ("protocol", "rded")


class _Problems:
  """Collects `key=value: what is wrong` lines."""

  def __init__(self, config):
    self.config = config
    self.lines: list[str] = []

  def value(self, key: str):
    node = self.config
    for part in key.split("."):
      node = node[part]
    return node

  def add(self, key: str, message: str) -> None:
    self.lines.append(f"{key}={self.value(key)!r}: {message}")

  def one_of(self, key: str, choices) -> None:
    if self.value(key) not in choices:
      self.add(key, f"accepted: {', '.join(map(str, choices))}")

  def at_least(self, key: str, low) -> None:
    value = self.value(key)
    if not isinstance(value, (int, float)) or value < low:
      self.add(key, f"must be >= {low}")

  def positive(self, key: str) -> None:
    value = self.value(key)
    if not isinstance(value, (int, float)) or not value > 0:
      self.add(key, "must be > 0")

  def raise_if_any(self, what: str) -> None:
    if self.lines:
      raise errors.InputError(f"{len(self.lines)} problem(s) in the {what}:\n  " +
                              "\n  ".join(self.lines))


def check_config(config) -> None:
  """Every enumerated key and cross-key constraint a run depends on; raises `InputError`."""
  p = _Problems(config)
  try:
    method = specs.method(config)
  except errors.InputError as e:
    p.lines.append(f"method={config.method!r}: {e}")
    method = registry.parse("mtt")
  base, plugins = method.base.name, method.plugins
  # Data.
  p.one_of("data.train_source", sources.SOURCES)
  test_source = config.data.test_source
  if not (test_source in sources.SOURCES or test_source.startswith("holdout")):
    p.add("data.test_source", f"accepted: {', '.join(sources.SOURCES)}, holdout:K")
  elif test_source.startswith("holdout"):
    k = test_source.partition(":")[2]
    if not k.isdigit() or int(k) < 1:
      p.add("data.test_source", "expected holdout:K with K >= 1 images per class")
  for split in ("train", "test"):
    if config.data[f"{split}_source"] in ("folder", "listfile") and not config.data[f"{split}_path"]:
      p.add(f"data.{split}_path", f"data.{split}_source={config.data[f'{split}_source']!r} needs a "
            "path (a folder, a .tar.gz or a list file)")
  p.one_of("data.imbalance_profile", longtail.PROFILES)
  p.at_least("data.imbalance_factor", 1)
  p.at_least("data.validation_per_class", 0)
  p.one_of("data.validation_from", longtail.VALIDATION_FROM)
  p.at_least("data.n_max", 0)
  p.at_least("data.image_size", 1)
  p.one_of("data.resize", sources.RESIZES)
  p.one_of("data.shot_rule", SHOT_RULES)
  p.at_least("data.zca_eps", 0)
  # DSA.
  p.one_of("dsa.mode", augment.MODES)
  try:
    augment.parse_strategy(config.dsa.strategy)
  except errors.InputError as e:
    p.add("dsa.strategy", str(e))
  # Model.
  p.one_of("model.name", models.ARCHS)
  p.one_of("model.norm", layers.NORMS)
  p.one_of("model.conv_impl", layers.CONV_IMPLS)
  p.one_of("model.ensemble_impl", ensemble.ENSEMBLE_IMPLS)
  p.one_of("model.init", layers.INITS)
  p.at_least("model.depth", 1)
  p.at_least("model.width", 1)
  if config.mesh.num_devices == 0 or config.mesh.num_devices < -1:
    p.add("mesh.num_devices", "use -1 (all devices) or a positive count")
  # Experts.
  p.at_least("experts.num_experts", 1)
  p.at_least("experts.epochs", 1)
  p.positive("experts.lr")
  p.at_least("experts.batch_size", 1)
  p.at_least("experts.momentum", 0)
  p.at_least("experts.weight_decay", 0)
  p.one_of("experts.sampling", training.SAMPLINGS)
  p.one_of("experts.classifier_sampling", training.SAMPLINGS)
  p.one_of("experts.loss", training.LOSSES)
  p.one_of("experts.balanced_epoch", training.BALANCED_EPOCHS)
  # Distillation.
  distilling = method.distils
  p.at_least("distill.ipc", 1)
  if distilling:
    for key in ("distill.syn_steps", "distill.expert_epochs", "distill.max_start_epoch",
                "distill.iterations", "distill.batch_syn", "distill.checkpoint_every",
                "distill.log_every"):
      p.at_least(key, 1)
    p.at_least("distill.eval_every", 0)
    p.positive("distill.lr_img")
    p.positive("distill.syn_lr_init")
    p.at_least("distill.lr_lr", 0)  # 0 keeps the student's lr fixed
    p.one_of("distill.init", INIT_MODES)
    p.one_of("distill.remat_policy", matching.REMAT_POLICIES)
    need = config.distill.max_start_epoch + config.distill.expert_epochs
    if need > config.experts.epochs:
      p.add("distill.max_start_epoch", f"+ distill.expert_epochs ({config.distill.expert_epochs}) "
            f"= {need} exceeds experts.epochs ({config.experts.epochs}); lower them or train "
            "longer experts")
  # The observers serve statistics matching and every relabelled evaluation (their teacher).
  if method.base.kind == registry.STATISTICS or config.evaluate.protocol == "relabel":
    for key in ("unilevel.observer_epochs", "unilevel.observer_batch_size",
                "unilevel.observer_projection_dim", "unilevel.recalibration_batch",
                "unilevel.iterations", "unilevel.crops", "distill.checkpoint_every",
                "distill.log_every"):
      p.at_least(key, 1)
    for key in ("unilevel.observer_lr", "unilevel.lr"):
      p.positive(key)
    for key in ("unilevel.observer_q", "unilevel.observer_weight_decay",
                "unilevel.observer_robust_weight", "unilevel.observer_debias_weight",
                "unilevel.ce_weight", "unilevel.statistics_weight", "unilevel.class_weight",
                "unilevel.first_multiplier"):
      p.at_least(key, 0)
    p.one_of("unilevel.observer_normalise", observer.NORMALISATIONS)
    p.one_of("unilevel.observer_schedule", observer.SCHEDULES)
    if not 0 <= config.unilevel.observer_warmup < 1:
      p.add("unilevel.observer_warmup", "is the share of the observers' epochs spent warming up: "
            "in [0, 1)")
    if not 0 < config.unilevel.min_scale <= 1:
      p.add("unilevel.min_scale", "is the least area share a crop keeps: in (0, 1]")
    for key in ("unilevel.beta1", "unilevel.beta2"):
      if not 0 <= getattr(config.unilevel, key.split(".")[1]) < 1:
        p.add(key, "Adam's betas are in [0, 1)")
  if method.options.soft_labels:
    p.at_least("datm.lr_label", 0)  # 0 keeps the initial soft labels
    p.at_least("datm.label_momentum", 0)
    p.at_least("datm.window_grow_every", 1)
    p.at_least("datm.min_start_epoch", 0)
    p.at_least("datm.initial_max_start_epoch", 1)
    if config.datm.min_start_epoch >= config.distill.max_start_epoch:
      p.add("datm.min_start_epoch", f"must be below distill.max_start_epoch "
            f"({config.distill.max_start_epoch})")
    if config.datm.label_expert_epoch > config.experts.epochs:
      p.add("datm.label_expert_epoch", f"the experts have {config.experts.epochs} epochs (-1: last)")
    init_experts = (config.ltdd if method.base.ltdd else config.datm).init_experts
    if init_experts == 0 or init_experts < -1:
      p.add(f"{base}.init_experts", "use -1 (all experts) or a positive count")
  if method.base.ltdd:
    p.one_of("ltdd.dam_reduction", training.WEIGHT_REDUCTIONS)
    p.at_least("ltdd.backbone_weight", 0)
    p.at_least("ltdd.classifier_weight", 0)
    if config.ltdd.ed:
      p.at_least("experts.classifier_epochs", 1)
      p.positive("experts.classifier_lr")
      p.at_least("ltdd.classifier_max_start_epoch", 1)
      last = config.ltdd.classifier_max_start_epoch - 1 + config.distill.expert_epochs
      if last > config.experts.classifier_epochs:
        p.add("ltdd.classifier_max_start_epoch", f"with distill.expert_epochs "
              f"({config.distill.expert_epochs}) its targets reach epoch {last}, past "
              f"experts.classifier_epochs ({config.experts.classifier_epochs})")
      if config.experts.classifier_from_epoch > config.experts.epochs:
        p.add("experts.classifier_from_epoch", f"the experts have {config.experts.epochs} epochs "
              "(-1: the last)")
  # Evaluation.
  p.at_least("evaluate.num_models", 1)
  p.at_least("evaluate.epochs", 1)
  p.at_least("evaluate.batch_size", 1)
  p.at_least("evaluate.test_batch_size", 1)
  p.at_least("evaluate.checkpoint_seconds", 0)
  p.positive("evaluate.lr")
  for arch in config.evaluate.archs:
    if arch not in models.ARCHS:
      p.add("evaluate.archs", f"{arch!r} is not an architecture; accepted: {', '.join(models.ARCHS)}")
  if base == "full":
    p.at_least("evaluate.full_epochs", 1)
    p.positive("evaluate.full_lr")
  # Grouping (the two-stage classifier and hierarchical distillation).
  p.one_of("grouping.strategy", grouping.STRATEGIES)
  p.one_of("grouping.prediction", PREDICTIONS)
  p.one_of("evaluate.protocol", EVALUATION_PROTOCOLS)
  p.positive("evaluate.relabel_temperature")
  p.one_of("evaluate.relabel_recipe", RELABEL_RECIPES)
  p.one_of("evaluate.rded.optimizer", training.OPTIMIZERS)
  p.positive("evaluate.rded.lr")
  p.at_least("evaluate.rded.weight_decay", 0)
  p.one_of("evaluate.rded.schedule", protocol_lib.STUDENT_SCHEDULES)
  p.at_least("evaluate.rded.batch_size", 0)
  p.one_of("evaluate.rded.mix", training.MIXES)
  p.positive("evaluate.rded.mix_beta")
  p.one_of("evaluate.rded.augment", specs.STUDENT_AUGMENTS)
  p.positive("evaluate.rded.temperature")
  if config.evaluate.relabel_recipe == "rded" and config.evaluate.relabel_temperature != 1.0:
    p.add("evaluate.relabel_temperature", "is ignored under evaluate.relabel_recipe=rded, whose "
          "teacher and student share evaluate.rded.temperature; set that one, or "
          "evaluate.relabel_recipe=protocol")
  if config.evaluate.protocol == "relabel" and method.two_stage:
    p.add("evaluate.protocol", "relabels the flat networks' class targets; the two-stage "
          "classifier's stages have none to relabel: use it with a method without +two_stage or "
          "+hierarchical")
  p.one_of("two_stage.arch", two_stage.ARCHS)
  p.one_of("two_stage.compare", (True, False))
  if (method.two_stage and config.grouping.stage1_loss == "balanced_softmax"
      and (config.two_stage.arch == "shared" or config.two_stage.compare)):
    p.add("grouping.stage1_loss", "the shared two-stage network (two_stage.arch=shared, or the "
          "comparison two_stage.compare=True trains) fits its heads with plain cross-entropy; "
          "set grouping.stage1_loss=ce, or two_stage.arch=separate with two_stage.compare=False")
  p.at_least("grouping.max_imbalance", 1)
  p.at_least("grouping.num_groups", 0)
  p.at_least("grouping.min_group_size", 1)
  p.one_of("grouping.stage1_sampling", training.BALANCE_SAMPLINGS)
  p.one_of("grouping.stage1_loss", training.LOSSES)
  p.at_least("grouping.lambda_1", 0)
  p.at_least("grouping.lambda_2", 0)
  p.at_least("grouping.ed_min_imbalance", 1)
  manual = tuple(config.grouping.manual)
  if config.grouping.strategy == "manual" and plugins and not manual:
    p.add("grouping.manual", "grouping.strategy=manual needs the groups, e.g. ((0, 1), (2, 3, 4))")
  if config.grouping.strategy != "manual" and manual:
    p.add("grouping.manual", f"is ignored unless grouping.strategy=manual (it is "
          f"{config.grouping.strategy!r}); set the strategy or clear the groups")
  if method.hierarchical and config.grouping.lambda_1 == 0 and config.grouping.lambda_2 == 0:
    p.add("grouping.lambda_1", "and grouping.lambda_2 are both 0: hierarchical distillation has "
          "nothing to match")
  # +rectify.
  p.one_of("rectify.mode", rectify.MODES)
  p.one_of("rectify.at", rectify.WHERE)
  if (method.rectifies and config.rectify.mode == "validation"
      and config.data.validation_per_class <= 0):
    p.add("rectify.mode", "chooses tau on the validation split, and data.validation_per_class "
          "is 0; set it > 0 or use rectify.mode=adsa")
  p.raise_if_any("config")


def check_counts(config, data) -> None:
  """The long-tailed training set a run would train on: at least two classes, and every class
  with at least one training image once the LT subset is drawn (a class with none names the knobs
  that decide its count); raises `InputError`."""
  counts, names = np.asarray(data.counts), data.class_names
  if len(counts) < 2:
    raise errors.InputError(
        f"The dataset has {len(counts)} class(es) ({', '.join(map(repr, names))}); long-tailed "
        "distillation needs at least 2 (a folder source takes one class per sub-folder).")
  empty = np.flatnonzero(counts == 0)
  if len(empty):
    c = int(empty[0])
    d = config.data
    raise errors.InputError(
        f"class {c} ({names[c]!r}) has 0 training images once the long-tailed subset is drawn "
        f"({len(empty)} class(es) have none; the smallest non-empty class has "
        f"{int(counts[counts > 0].min()) if (counts > 0).any() else 0}): lower "
        f"data.imbalance_factor (now {d.imbalance_factor:g}), raise data.n_max (now {d.n_max}; 0: "
        f"all a class has), or set aside fewer images (data.validation_per_class={d.validation_per_class}, "
        f"data.test_source={d.test_source!r}).")


def check_with_data(config, data) -> None:
  """Checks that need the loaded dataset (its class counts and names); raises `InputError`, and
  says in one line per class which classes will repeat images to reach the IPC."""
  check_counts(config, data)
  counts = np.asarray(data.counts)
  p = _Problems(config)
  method = specs.method(config)
  base, plugins = method.base.name, method.plugins
  num_classes = len(counts)
  ipc = config.distill.ipc
  if base != "full" and not config.distill.allow_duplicates and (counts < ipc).any():
    short = np.flatnonzero(counts < ipc)
    p.add("distill.ipc", f"class {int(short[0])} has only {int(counts[short[0]])} training images "
          f"({len(short)} classes are short); lower distill.ipc or set "
          "distill.allow_duplicates=True to repeat the images of short classes")
  if base != "full" and config.distill.allow_duplicates:
    for c in short_classes(counts, ipc):
      logging.warning("distill.ipc=%d: class %d (%s) has %d training images; they are repeated "
                      "to reach it.", ipc, c, data.class_names[c], int(counts[c]))
  if method.base.kind == registry.STATISTICS and (counts * config.unilevel.crops < ipc).any():
    c = int(np.flatnonzero(counts * config.unilevel.crops < ipc)[0])
    p.add("unilevel.crops", f"class {c} has {int(counts[c])} training images: x "
          f"{config.unilevel.crops} crops they cannot start distill.ipc={ipc} images; raise "
          "unilevel.crops or lower distill.ipc")
  if plugins and config.grouping.strategy == "manual":
    try:
      grouping.Grouping(tuple(tuple(int(c) for c in g) for g in config.grouping.manual),
                        num_classes)
    except (errors.InputError, TypeError, ValueError) as e:
      p.add("grouping.manual", str(e))
  if plugins and config.grouping.num_groups > num_classes:
    p.add("grouping.num_groups", f"the dataset has {num_classes} classes")
  p.raise_if_any("config for this dataset")


def short_classes(counts: np.ndarray, ipc: int) -> list[int]:
  """Classes with fewer training images than `ipc` (their images are repeated)."""
  return [int(c) for c in np.flatnonzero(np.asarray(counts) < ipc)]
