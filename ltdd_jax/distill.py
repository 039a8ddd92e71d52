"""The distillation loop (DESIGN §4): synthetic images, lr and labels learned by trajectory matching.

Methods: `mtt` (images + lr), `datm` (+ soft labels from expert logits, growing start-epoch window),
`ltdd` (DATM options + class-frequency-weighted inner loss (DAM) + backbone/classifier decoupled
matching against classifier-only experts (ED)). The loss itself is a `MatchingObjective`, so the
two-stage hierarchical plugin can combine several of them over the same synthetic images.

Resumable: the state (images, lr, labels, optimiser states) is checkpointed with orbax every
`distill.checkpoint_every` iterations; the PRNG key and the expert drawn at iteration i are functions
of (seed, i), so a resumed run is bitwise the same as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
import zipfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ltdd_jax import checkpoints, errors, matching, models, parallel, reporting, selection, training
from ltdd_jax import evaluate as evaluate_lib
from ltdd_jax import experts as experts_lib

METHODS = ("mtt", "datm", "ltdd")


class DivergenceError(errors.DivergedError):
  """The matching loss or the synthetic set became NaN/Inf."""


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


# ----------------------------------------------------------------------------------------------
# Matching objectives: one expert set (or a pair for ED), its sampling rule and its loss.


@dataclasses.dataclass
class MatchingObjective:
  """A source of (start, target) expert pairs and the matching loss against them.

  Attributes:
    experts: expert trajectories: an `experts.TrajectoryReader` (reads the sampled epochs from
      disk) or `experts.StackedTrajectories` (in memory); `.get(k, epoch)` -> parameters.
    classifier_experts: classifier-only trajectories for LTDD's ED (or None).
    apply_fn: the student's (params, images) -> logits.
    label_map: [C] int mapping dataset classes to this objective's outputs (-1: not its class).
      Identity for flat distillation; group ids or within-group ids for the hierarchical plugin.
    num_outputs: outputs of this objective's networks.
    image_index: which synthetic images the student trains on (None: all), e.g. a group's.
    classifier_experts: classifier-only trajectories for LTDD's ED, the same interface (or None).
    class_weights: [num outputs] DAM weights (or None).
    ed: how the classifier term is drawn and weighed under ED (with `classifier_experts`).
    syn_steps: the student's inner steps for this objective (None: `distill.syn_steps`); the
      hierarchical stage 2 sizes it to its experts' steps per epoch.
    name: what the objective matches (`flat`; `groups` and `group_<g>` for the hierarchical
      stages): names its learned lr when every objective learns its own.
  """
  experts: Any
  apply_fn: Callable
  label_map: np.ndarray
  num_outputs: int
  image_index: np.ndarray | None = None
  classifier_experts: Any = None
  class_weights: np.ndarray | None = None
  ed: EDSpec = EDSpec()
  syn_steps: int | None = None
  name: str = "flat"

  @property
  def num_experts(self) -> int:
    return self.experts.num_experts

  @property
  def num_epochs(self) -> int:
    return self.experts.num_epochs

  def sample(self, rng: np.random.Generator, lo: int, hi: int, expert_epochs: int):
    """Draws an expert k and start epoch s in [lo, hi); returns the host arrays the loss needs."""
    k = int(rng.integers(self.num_experts))
    s = int(rng.integers(lo, hi))
    pair = {"start": self.experts.get(k, s), "target": self.experts.get(k, s + expert_epochs)}
    if self.classifier_experts is not None:  # LTDD's classifier window: [0, ed.max_start_epoch).
      sc = int(rng.integers(0, self.ed.max_start_epoch))
      pair["cls_start"] = self.classifier_experts.get(k, sc)
      pair["cls_target"] = self.classifier_experts.get(k, sc + expert_epochs)
    return pair

  @property
  def num_classifier_epochs(self) -> int:
    return self.classifier_experts.num_epochs

  def loss(self, spec: matching.InnerSpec, dsa_config, images, targets, syn_lr, pair, key,
           mesh=None):
    """The matching loss of this objective on its images, with labels mapped to its outputs."""
    if self.image_index is not None:
      images, targets = images[self.image_index], targets[self.image_index]
    mapped = jnp.asarray(self.label_map)
    if targets.ndim == 1:
      local_targets = mapped[targets]
    else:  # Soft labels: the probability mass of the classes mapping to each output, renormalised.
      onehot = jax.nn.one_hot(mapped, self.num_outputs) * (mapped >= 0)[:, None]
      local_targets = targets @ onehot
      local_targets = local_targets / jnp.maximum(local_targets.sum(-1, keepdims=True), 1e-12)
    weights = None if self.class_weights is None else jnp.asarray(self.class_weights)
    if "cls_start" not in pair:
      return matching.trajectory_matching_loss(
          self.apply_fn, spec, dsa_config, images, local_targets, syn_lr, pair["start"],
          pair["target"], key, weights, mesh, "all")
    backbone = matching.trajectory_matching_loss(
        self.apply_fn, spec, dsa_config, images, local_targets, syn_lr, pair["start"],
        pair["target"], key, weights, mesh, "backbone")
    head_spec = dataclasses.replace(spec, train_part="head" if self.ed.freeze_backbone else "all")
    head = matching.trajectory_matching_loss(
        self.apply_fn, head_spec, dsa_config, images, local_targets, syn_lr, pair["cls_start"],
        pair["cls_target"], jax.random.fold_in(key, 1), weights if self.ed.dam else None, mesh,
        "head")
    return self.ed.backbone_weight * backbone + self.ed.classifier_weight * head


def make_objective(config, expert_set: experts_lib.ExpertSet,
                   classifier_set: experts_lib.ExpertSet | None, label_map, num_outputs: int,
                   counts, image_index=None, name: str = "flat") -> MatchingObjective:
  """A matching objective against one expert set (and its classifier experts under ED).

  Args:
    label_map: [C] dataset class -> this objective's output (-1: not its class).
    num_outputs: outputs of the experts' networks.
    counts: [num_outputs] training images per output (DAM weights).
    image_index: the synthetic images this objective trains on (None: all).
    name: the objective's name (see `MatchingObjective`).
  """
  options = method_options(config)
  model = models.make_classifier(config.model, num_outputs)
  return MatchingObjective(
      experts=experts_lib.TrajectoryReader(expert_set), apply_fn=training.make_apply(model),
      label_map=np.asarray(label_map), num_outputs=num_outputs, image_index=image_index,
      classifier_experts=experts_lib.TrajectoryReader(classifier_set) if options.ed else None,
      class_weights=matching.class_frequency_weights(counts) if options.dam else None,
      ed=ed_spec(config.ltdd), name=name)


def flat_objective(config, data, expert_set: experts_lib.ExpertSet,
                   classifier_set: experts_lib.ExpertSet | None) -> MatchingObjective:
  """The objective of flat (non-hierarchical) distillation against one expert set."""
  return make_objective(config, expert_set, classifier_set, np.arange(data.num_classes),
                        data.num_classes, data.counts)


# ----------------------------------------------------------------------------------------------
# Synthetic-set initialisation.


@dataclasses.dataclass(frozen=True)
class LabelInitSpec:
  """How DATM-style soft labels and their images are initialised from a labelling expert set.

  Attributes:
    search_experts: how many experts (in order) are searched for images they classify correctly,
      until a class has `ipc` of them (-1: all; DATM cycles through its experts, LTDD's stored
      code makes one pass with the first).
    duplicate: a class with fewer correctly classified images than `ipc` repeats them (LTDD's
      `duplicate`); otherwise it is filled with its other images.
    label_epoch: the experts' epoch whose logits are used (-1: the last).
  """
  search_experts: int = -1
  duplicate: bool = False
  label_epoch: int = -1


def label_init_spec(config) -> LabelInitSpec:
  """`config.datm` for datm, `config.ltdd` for ltdd (their published selections differ)."""
  method_config = config.ltdd if config.method.split("+")[0] == "ltdd" else config.datm
  return LabelInitSpec(search_experts=method_config.init_experts,
                       duplicate=method_config.duplicate,
                       label_epoch=config.datm.label_expert_epoch)


def expert_logits(protocol: evaluate_lib.Protocol, expert_set: experts_lib.ExpertSet,
                  images: np.ndarray, epoch: int = -1) -> np.ndarray:
  """[K, N, C] logits of every expert of a set at one epoch (-1: the last) on `images`, run as
  the evaluation protocol runs trained networks."""
  model = models.make_classifier(protocol.model, expert_set.num_classes)
  return protocol.logits(model, expert_set.at_epoch(epoch), images)


def expert_correct(protocol: evaluate_lib.Protocol, expert_set: experts_lib.ExpertSet, images: np.ndarray,
                   labels: np.ndarray, experts: int = -1, epoch: int = -1) -> np.ndarray:
  """[K', N] bool: expert k classifies image n correctly, for the first `experts` experts (-1:
  all), one expert at a time so that memory holds booleans, not [K, N, C] logits."""
  epoch = expert_set.epochs if epoch < 0 or epoch > expert_set.epochs else epoch
  count = expert_set.num_experts if experts < 0 else min(experts, expert_set.num_experts)
  model = models.make_classifier(protocol.model, expert_set.num_classes)
  rows = []
  for k in range(count):
    params = jax.tree.map(lambda x: x[None], expert_set.load_epoch(k, epoch))
    logits = protocol.logits(model, params, images)[0]
    rows.append(logits.argmax(-1) == labels)
  return np.stack(rows)


def select_correct(correct: np.ndarray, labels: np.ndarray, num_classes: int, ipc: int,
                   spec: LabelInitSpec, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """DATM's `samples_predicted_correctly` image selection.

  For each class, its images in a seeded random order are taken when the first expert classifies
  them correctly, then the second's, ... (`spec.search_experts`), without repeats, until `ipc`.
  A class left short repeats what it found (`spec.duplicate`) or is filled with its other images;
  a class with no correctly classified image at all takes random images of its own.

  Args:
    correct: [K, N] bool, expert k classifies training image n correctly.
    labels: [N] training labels.

  Returns:
    (indices [C * ipc], found [C]: correctly classified images found per class, before filling).
  """
  searched = correct if spec.search_experts < 0 else correct[:spec.search_experts]
  idx, found = [], np.zeros(num_classes, np.int64)
  for c in range(num_classes):
    rng = np.random.default_rng([seed, c, 29])
    members = rng.permutation(np.flatnonzero(labels == c))
    chosen = []
    for expert_correct in searched:
      chosen += [i for i in members[expert_correct[members]] if i not in chosen][:ipc - len(chosen)]
      if len(chosen) == ipc:
        break
    found[c] = len(chosen)
    rest = [i for i in members if i not in chosen]
    if len(chosen) < ipc and chosen and (spec.duplicate or not rest):
      chosen = list(np.resize(chosen, ipc))
    elif len(chosen) < ipc:
      chosen += list(rng.choice(rest, ipc - len(chosen), replace=len(rest) < ipc - len(chosen)))
    idx.append(np.asarray(chosen, np.int64))
  return np.concatenate(idx), found


def class_correct_logits(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Label logits that put 0.9 of the mass on each image's own class (a class-correct start)."""
  probs = np.where(np.eye(num_classes)[labels] > 0, 0.9, 0.1 / max(num_classes - 1, 1))
  return np.log(probs).astype(np.float32)


def mean_correct_logits(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """DATM's / LTDD's initial label logits: per image, the mean logits of the experts that classify
  it correctly (whose argmax is then its class); images no expert gets right fall back to
  `class_correct_logits`.

  Args:
    logits: [K, N, C] experts' logits on the N chosen images.
    labels: [N] their classes.

  Returns:
    (label logits [N, C], from_experts [N] bool).
  """
  correct = logits.argmax(-1) == labels[None]  # [K, N]
  count = correct.sum(0)
  mean = (logits * correct[..., None]).sum(0) / np.maximum(count, 1)[:, None]
  fallback = class_correct_logits(labels, logits.shape[-1])
  return np.where((count > 0)[:, None], mean, fallback).astype(np.float32), count > 0


def initial_synthetic(config, data, expert_set: experts_lib.ExpertSet | None,
                      label_set: experts_lib.ExpertSet | None = None) -> tuple[dict, dict]:
  """Initial synthetic state: images [C*ipc, ...], log_lr, and label_logits when soft.

  Real init draws `ipc` training images per class (repeating the images of classes with fewer when
  `distill.allow_duplicates`). With soft labels (datm, ltdd) and `datm.correct_only`, images are
  chosen among those the labelling experts classify correctly (`select_correct`) and their label
  logits are the mean over the experts that do (`mean_correct_logits`). The labelling experts are
  `label_set` when given (LTDD: the class-balanced classifier experts) and `expert_set` otherwise.

  Returns:
    (state, record): record holds, per class, `init_label_acc` (share of its images whose initial
    label's argmax is the class), `init_expert_correct` (share whose labels come from experts that
    classify them correctly, the rest from the class-correct fallback) and `init_found` (correctly
    classified images found before any repetition or filling); empty for hard labels.
  """
  cfg = config.distill
  options = method_options(config)
  protocol = evaluate_lib.Protocol.from_config(config)
  ipc, num_classes = cfg.ipc, data.num_classes
  selection.check_ipc(data.train_labels, num_classes, ipc, cfg.allow_duplicates)
  labels = np.repeat(np.arange(num_classes), ipc).astype(np.int32)
  found = None
  if options.soft_labels:
    source = label_set or expert_set
    if source is None:
      raise errors.InputError("Soft labels need an expert set to initialise them from.")
    spec = label_init_spec(config)
  if cfg.init == "real":
    if options.soft_labels and config.datm.correct_only:
      correct = expert_correct(protocol, source, data.train_images, data.train_labels,
                               spec.search_experts, spec.label_epoch)
      idx, found = select_correct(correct, data.train_labels, num_classes, ipc, spec, config.seed)
    else:
      idx = selection.random_selection(data.train_labels, num_classes, ipc, config.seed,
                                       cfg.allow_duplicates)
    images = data.train_images[idx].copy()
  elif cfg.init == "noise":
    images = np.random.default_rng(config.seed).normal(
        size=(num_classes * ipc, *data.image_shape)).astype(np.float32)
    idx = None
  else:
    raise errors.InputError(f"distill.init must be 'real' or 'noise', got {cfg.init!r}.")
  state = {"images": images.astype(np.float32),
           "log_lr": np.float32(np.log(cfg.syn_lr_init)), "labels": labels}
  if not options.soft_labels:
    return state, {}
  if idx is None:  # Noise images: an expert's logits on them mean nothing.
    label_logits = class_correct_logits(labels, num_classes)
    from_experts = np.zeros(len(labels), bool)
  else:  # Every labelling expert's logits, on the chosen images only.
    logits = expert_logits(protocol, source, data.train_images[idx], spec.label_epoch)
    label_logits, from_experts = mean_correct_logits(logits, labels)
  state["label_logits"] = label_logits
  per_class = lambda v: np.asarray([v[labels == c].mean() for c in range(num_classes)], np.float32)
  record = {"init_label_acc": per_class(label_logits.argmax(-1) == labels),
            "init_expert_correct": per_class(from_experts)}
  if found is not None:
    record["init_found"] = found
  return state, record


# ----------------------------------------------------------------------------------------------
# The outer optimisation.


def make_optimizers(config, options: MethodOptions) -> dict[str, optax.GradientTransformation]:
  """SGD with momentum for images and lr (`distill.momentum`) and soft labels
  (`datm.label_momentum`, DATM's and LTDD's `Momentum_y`).

  The lr is learned as log(lr); `distill.lr_lr` keeps its MTT meaning (a step on lr itself), so the
  log-space step size is lr_lr / syn_lr_init^2, which makes the first update equal MTT's.
  """
  cfg = config.distill
  opts = {"images": optax.sgd(cfg.lr_img, momentum=cfg.momentum),
          "log_lr": optax.sgd(cfg.lr_lr / cfg.syn_lr_init**2, momentum=cfg.momentum)}
  if options.soft_labels:
    opts["label_logits"] = optax.sgd(config.datm.lr_label, momentum=config.datm.label_momentum)
  return opts


def targets_of(syn: dict) -> jax.Array:
  """Training targets of the synthetic set: soft probabilities or int labels."""
  if "label_logits" in syn:
    return matching.soft_targets(syn["label_logits"])
  return syn["labels"]


def make_update_fn(config, objectives: list[MatchingObjective], weights: list[float], mesh):
  """jit(update)(syn, opt_state, pairs, key) -> (syn, opt_state, loss, losses).

  The loss is sum_i weights[i] * objective_i.loss; gradients flow to every learnable leaf of syn.
  """
  options = method_options(config)
  spec = matching.InnerSpec(syn_steps=config.distill.syn_steps,
                            batch_syn=config.distill.batch_syn, remat=config.distill.remat,
                            remat_policy=config.distill.remat_policy,
                            weight_reduction=config.ltdd.dam_reduction,
                            dsa=config.distill.dsa)
  opts = make_optimizers(config, options)
  learnable = tuple(opts)

  def total_loss(learn, fixed, pairs, key):
    syn = {**fixed, **learn}
    targets = targets_of(syn)
    syn_lr = jnp.exp(syn["log_lr"])  # One lr, or one per objective (distill.lr_per_objective).
    losses = [obj.loss(spec if obj.syn_steps is None else
                       dataclasses.replace(spec, syn_steps=obj.syn_steps),
                       config.dsa, syn["images"], targets,
                       syn_lr[i] if syn_lr.ndim else syn_lr, pair, jax.random.fold_in(key, i),
                       mesh)
              for i, (obj, pair) in enumerate(zip(objectives, pairs))]
    return sum(w * l for w, l in zip(weights, losses)), jnp.stack(losses)

  @jax.jit
  def update(syn, opt_state, pairs, key):
    learn = {k: syn[k] for k in learnable}
    fixed = {k: v for k, v in syn.items() if k not in learnable}
    (loss, losses), grads = jax.value_and_grad(total_loss, has_aux=True)(learn, fixed, pairs, key)
    new_state, new_learn = {}, {}
    for k in learnable:
      updates, new_state[k] = opts[k].update(grads[k], opt_state[k], learn[k])
      new_learn[k] = optax.apply_updates(learn[k], updates)
    return {**syn, **new_learn}, new_state, loss, losses

  def init(syn):
    return {k: opts[k].init(jnp.asarray(syn[k])) for k in learnable}

  return update, init


@dataclasses.dataclass(frozen=True)
class StartWindow:
  """Where start epochs are drawn: [0, max_start) throughout, or (`grows`, DATM) from
  [min_start, initial_max_start) growing by one epoch every `grow_every` iterations up to
  max_start."""
  max_start: int
  grows: bool = False
  min_start: int = 0
  initial_max_start: int = 2
  grow_every: int = 50

  @classmethod
  def from_config(cls, config, options: MethodOptions) -> "StartWindow":
    """`distill.max_start_epoch`, grown as `config.datm` says when the method grows it."""
    return cls(config.distill.max_start_epoch, options.grow_window, config.datm.min_start_epoch,
               config.datm.initial_max_start_epoch, config.datm.window_grow_every)

  def at(self, iteration: int) -> tuple[int, int]:
    """[lo, hi) of start epochs at an iteration."""
    if not self.grows:
      return 0, self.max_start
    grown = self.initial_max_start + iteration // max(1, self.grow_every)
    return self.min_start, max(self.min_start + 1, min(self.max_start, grown))


def check_epochs(config, objectives: list[MatchingObjective]) -> None:
  """max_start_epoch + expert_epochs must fit inside every expert trajectory (and, under ED, the
  classifier window inside every classifier trajectory)."""
  need = config.distill.max_start_epoch + config.distill.expert_epochs
  for obj in objectives:
    if need > obj.num_epochs:
      raise errors.InputError(
          f"distill.max_start_epoch ({config.distill.max_start_epoch}) + expert_epochs "
          f"({config.distill.expert_epochs}) = {need} exceeds the experts' {obj.num_epochs} epochs; "
          "lower them or train longer experts (experts.epochs).")
    if obj.classifier_experts is None:
      continue
    last = obj.ed.max_start_epoch - 1 + config.distill.expert_epochs
    if obj.ed.max_start_epoch < 1 or last > obj.num_classifier_epochs:
      raise errors.InputError(
          f"ltdd.classifier_max_start_epoch ({obj.ed.max_start_epoch}) must be >= 1 and, with "
          f"distill.expert_epochs ({config.distill.expert_epochs}), reach at most epoch "
          f"{obj.num_classifier_epochs} of the classifier experts; lower it or raise "
          "experts.classifier_epochs.")


def run_distillation(config, data, objectives: list[MatchingObjective], weights: list[float],
                     init_syn: dict, workdir, mesh) -> dict:
  """Runs (or resumes) the outer loop; returns the final synthetic state (host numpy).

  Writes `<workdir>/distill_ckpt/` checkpoints and appends to `metrics.jsonl`. Raises
  `DivergenceError` (keeping the last good checkpoint) when the loss or the images stop being finite.
  """
  cfg = config.distill
  workdir = pathlib.Path(workdir)
  window = StartWindow.from_config(config, method_options(config))
  check_epochs(config, objectives)
  update, init_opt = make_update_fn(config, objectives, weights, mesh)
  syn = {k: jnp.asarray(v) for k, v in init_syn.items()}
  if cfg.lr_per_objective and len(objectives) > 1:
    syn["log_lr"] = jnp.full((len(objectives),), syn["log_lr"])
  state = {"syn": syn, "opt": init_opt(syn)}
  store = checkpoints.Checkpoints(workdir / "distill_ckpt", max_to_keep=2)
  start = store.latest_step()
  if start is not None:
    state = jax.tree.map(jnp.asarray, store.restore(start, state))
  else:
    start = 0
    store.save(0, state)
  state = parallel.replicate(state, mesh)
  metrics = reporting.MetricsWriter(workdir)
  metrics.drop_after(("distill", "distill_validation"), start)
  progress = reporting.Progress("distill", cfg.iterations, start)
  base = jax.random.key(config.seed)
  t0 = time.time()
  def draw(it):  # The expert pairs of iteration `it`: a function of (seed, it) alone.
    rng = np.random.default_rng([config.seed, it])
    lo, hi = window.at(it)
    return [obj.sample(rng, lo, hi, cfg.expert_epochs) for obj in objectives], (lo, hi)

  upcoming = draw(start) if start < cfg.iterations else None
  for it in range(start, cfg.iterations):
    pairs, (lo, hi) = upcoming
    syn, opt, loss, losses = update(state["syn"], state["opt"], pairs,
                                    jax.random.fold_in(base, it))
    if it + 1 < cfg.iterations:  # Read the next pairs from disk while this update computes.
      upcoming = draw(it + 1)
    loss = float(loss)
    if not np.isfinite(loss) or not bool(jnp.isfinite(syn["images"]).all()):
      last = store.latest_step()
      raise DivergenceError(
          f"Distillation diverged at iteration {it + 1}: matching loss {loss}. The last good state "
          f"is checkpoint {last} in {store.directory}. Lower distill.lr_img (now {cfg.lr_img}) or "
          f"distill.lr_lr (now {cfg.lr_lr}) and resume with the same --workdir, or start afresh.")
    state = {"syn": syn, "opt": opt}
    done = it + 1
    if done % cfg.log_every == 0 or done == cfg.iterations:
      metrics.write("distill", done, loss=loss, losses=np.asarray(losses).tolist(),
                    syn_lr=np.exp(np.asarray(syn["log_lr"])).tolist(), start_window=[lo, hi],
                    seconds=time.time() - t0)
    if done % cfg.checkpoint_every == 0 or done == cfg.iterations:
      store.save(done, state)
    if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.iterations:
      report = validate(config, data, parallel.gather(syn), mesh)
      metrics.write("distill_validation", done, val_acc=report["test_acc_mean"],
                    val_acc_std=report["test_acc_std"])
    lrs = " ".join(f"{x:.4f}" for x in np.exp(np.atleast_1d(np.asarray(syn["log_lr"]))))
    progress.update(done, f"loss {loss:.4f} lr {lrs}")
  store.close()
  return parallel.gather(state["syn"])


def validate(config, data, syn: dict, mesh) -> dict:
  """Evaluates a synthetic state on the validation split (model selection; never test)."""
  labelled = evaluate_lib.LabelledSet(
      np.asarray(syn["images"]), np.asarray(syn["labels"]), np.asarray(targets_of(syn)),
      synthetic_lr(syn, config.evaluate), config.evaluate.epochs, config.distill.ipc,
      config.method)
  return evaluate_lib.evaluate_set(evaluate_lib.Protocol.from_config(config), data, labelled,
                                   seed=config.seed, mesh=mesh, split="validation")


def synthetic_lr(syn: dict, evaluate_config) -> float:
  """The evaluation lr of a synthetic set: the learned one, or evaluate.lr when told not to use it.

  A set distilled with one lr per objective (hierarchical) and evaluated by one flat network gets
  their geometric mean; the two-stage classifier uses each network's own (`synthetic_lrs`)."""
  if not evaluate_config.use_learned_lr:
    return evaluate_config.lr
  return float(np.exp(np.mean(syn["log_lr"])))


def synthetic_lrs(syn: dict, evaluate_config) -> dict[str, float]:
  """Objective name -> learned lr of a set distilled with one lr per objective ({} otherwise, or
  when `evaluate.use_learned_lr` is off)."""
  if not evaluate_config.use_learned_lr or "lr_objectives" not in syn:
    return {}
  return {str(n): float(v) for n, v in zip(syn["lr_objectives"], np.exp(syn["log_lr"]))}


def save_synthetic(workdir, syn: dict, data, config, objective_names=(),
                   label_record: dict | None = None) -> pathlib.Path:
  """Writes `synthetic.npz` (model-space and pixel-space images, labels, soft labels, lr) and the
  PNG grid `synthetic.png`. With one lr per objective, `lr` is a vector and `lr_objectives` (from
  `objective_names`) names its entries; `label_record` (the soft labels' per-class initial record
  from `initial_synthetic`) is stored beside them."""
  workdir = pathlib.Path(workdir)
  pixels = data.preprocessor.invert(syn["images"])
  lr = np.exp(np.asarray(syn["log_lr"], np.float32))
  out = {"images": syn["images"], "pixels": pixels, "labels": syn["labels"], "lr": lr}
  if lr.ndim:
    if len(objective_names) != len(lr):
      raise errors.InputError(f"{len(lr)} learned lrs but objective names {list(objective_names)}.")
    out["lr_objectives"] = np.asarray(objective_names, dtype=str)
  if "label_logits" in syn:
    out["label_logits"] = syn["label_logits"]
    out["soft_labels"] = np.asarray(matching.soft_targets(jnp.asarray(syn["label_logits"])))
  out.update({k: np.asarray(v) for k, v in (label_record or {}).items()})
  path = workdir / "synthetic.npz"
  workdir.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(path, **out)
  lo, hi = np.percentile(pixels, [1, 99])
  reporting.image_grid((pixels - lo) / max(hi - lo, 1e-6), syn["labels"], workdir / "synthetic.png",
                       per_class=min(config.distill.ipc, 10),
                       title=f"{config.method} synthetic set, IPC {config.distill.ipc}")
  return path


def load_synthetic(path, num_classes: int | None = None,
                   image_shape: tuple[int, ...] | None = None) -> dict:
  """Reads `synthetic.npz` back: images (model space), labels, lr and soft labels if present.

  Validates what evaluation relies on, so a wrong or damaged file fails here with its path: the
  keys `images`, `labels`, `lr`; as many labels (and soft labels) as images; labels in
  [0, num_classes) and images of `image_shape` when given; finite positive lrs."""
  path = pathlib.Path(path)
  if not path.exists():
    raise errors.MissingError(f"No synthetic set at {path}; run distillation first "
                              "(python -m launch.distill ...).")
  try:
    with np.load(path) as f:
      out = {k: f[k] for k in f.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise errors.InputError(f"{path} is not a readable synthetic set ({type(e).__name__}: {e}); it "
                            "is empty or truncated: distil it again or point at another file.") from e
  bad = lambda why: errors.InputError(f"{path}: {why}.")
  missing = [k for k in ("images", "labels", "lr") if k not in out]
  if missing:
    raise bad(f"missing {', '.join(missing)} (a synthetic set has images, labels and lr)")
  images, labels, lr = out["images"], out["labels"], np.asarray(out["lr"])
  if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels):
    raise bad(f"{images.shape} images but {labels.shape} labels; expected [N, H, W, C] and [N]")
  if "soft_labels" in out and out["soft_labels"].shape[0] != len(images):
    raise bad(f"{out['soft_labels'].shape[0]} soft labels for {len(images)} images")
  if not np.issubdtype(labels.dtype, np.integer) or (
      len(labels) and (labels.min() < 0 or (num_classes is not None and labels.max() >= num_classes))):
    raise bad(f"labels must be integers in [0, {num_classes}), got {labels.dtype} in "
              f"[{labels.min() if len(labels) else '-'}, {labels.max() if len(labels) else '-'}]")
  if image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
    raise bad(f"images are {images.shape[1:]} but the dataset's are {tuple(image_shape)}; "
              "evaluate with the config it was distilled with")
  if not (np.isfinite(lr).all() and (lr > 0).all()):
    raise bad(f"learning rate {lr} must be finite and > 0")
  if not np.isfinite(images).all():
    raise bad("images contain NaN or Inf")
  out["log_lr"] = np.log(lr)
  return out
