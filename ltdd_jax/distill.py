"""The distillation loop (DESIGN §4): synthetic images, lr and labels learned by trajectory matching.

Methods (`ltdd_jax/methods.py`): `mtt` (images + lr), `datm` (+ soft labels from expert logits,
growing start-epoch window), `ltdd` (DATM options + class-frequency-weighted inner loss (DAM) +
backbone/classifier decoupled matching against classifier-only experts (ED)). The loss itself is a
`MatchingObjective`, so the two-stage hierarchical plugin can combine several of them over the same
synthetic images. The synthetic set's initial state and its file are `ltdd_jax/synthetic.py`'s.

Resumable: the state (images, lr, labels, optimiser states) is checkpointed with orbax every
`distill.checkpoint_every` iterations; the PRNG key and the expert drawn at iteration i are functions
of (seed, i), so a resumed run is bitwise the same as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ltdd_jax import checkpoints, errors, matching, methods, models, parallel, reporting, synthetic
from ltdd_jax import training
from ltdd_jax import evaluate as evaluate_lib
from ltdd_jax import experts as experts_lib


class DivergenceError(errors.DivergedError):
  """The matching loss or the synthetic set became NaN/Inf."""


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
  ed: methods.EDSpec = methods.EDSpec()
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
                   counts, sampling: str, image_index=None, name: str = "flat") -> MatchingObjective:
  """A matching objective against one expert set (and its classifier experts under ED).

  Args:
    classifier_set: the classifier experts of LTDD's ED; None leaves the objective without ED's
      classifier term (plain matching of the whole network).
    label_map: [C] dataset class -> this objective's output (-1: not its class).
    num_outputs: outputs of the experts' networks.
    counts: [num_outputs] training images per output (DAM weights).
    sampling: how the experts drew their images (`instance` or `class_balanced`): the DAM weights
      follow the distribution the experts trained on (`matching.sampled_class_counts`).
    image_index: the synthetic images this objective trains on (None: all).
    name: the objective's name (see `MatchingObjective`).
  """
  options = methods.method_options(config)
  model = models.make_classifier(config.model, num_outputs)
  return MatchingObjective(
      experts=experts_lib.TrajectoryReader(expert_set), apply_fn=training.make_apply(model),
      label_map=np.asarray(label_map), num_outputs=num_outputs, image_index=image_index,
      classifier_experts=(experts_lib.TrajectoryReader(classifier_set)
                          if options.ed and classifier_set is not None else None),
      class_weights=(matching.class_frequency_weights(matching.sampled_class_counts(counts, sampling))
                     if options.dam else None),
      ed=methods.ed_spec(config.ltdd), name=name)


def flat_objective(config, data, expert_set: experts_lib.ExpertSet,
                   classifier_set: experts_lib.ExpertSet | None) -> MatchingObjective:
  """The objective of flat (non-hierarchical) distillation against one expert set."""
  if methods.method_options(config).ed and classifier_set is None:
    raise errors.InputError("LTDD's expert decoupling (ltdd.ed) needs the classifier experts; "
                            "none were given (train them with experts.classifier_epochs >= 1).")
  return make_objective(config, expert_set, classifier_set, np.arange(data.num_classes),
                        data.num_classes, data.counts, config.experts.sampling)


# ----------------------------------------------------------------------------------------------
# The outer optimisation.


def make_optimizers(config, options: methods.MethodOptions) -> dict[str, optax.GradientTransformation]:
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


def inner_spec(config, objective: MatchingObjective | None = None) -> matching.InnerSpec:
  """The student's inner training of the run (of `objective`, whose unroll may be its own)."""
  cfg = config.distill
  steps = objective.syn_steps if objective is not None and objective.syn_steps else cfg.syn_steps
  return matching.InnerSpec(syn_steps=steps, batch_syn=cfg.batch_syn, remat=cfg.remat,
                            remat_policy=cfg.remat_policy,
                            weight_reduction=config.ltdd.dam_reduction, dsa=cfg.dsa)


def make_update_fn(config, objectives: list[MatchingObjective], weights: list[float], mesh):
  """jit(update)(syn, opt_state, pairs, key) -> (syn, opt_state, loss, losses).

  The loss is sum_i weights[i] * objective_i.loss; gradients flow to every learnable leaf of syn.
  """
  options = methods.method_options(config)
  opts = make_optimizers(config, options)
  learnable = tuple(opts)

  def total_loss(learn, fixed, pairs, key):
    syn = {**fixed, **learn}
    targets = synthetic.targets_of(syn)
    syn_lr = jnp.exp(syn["log_lr"])  # One lr, or one per objective (distill.lr_per_objective).
    losses = [obj.loss(inner_spec(config, obj), config.dsa, syn["images"], targets,
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
  def from_config(cls, config, options: methods.MethodOptions) -> "StartWindow":
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
  window = StartWindow.from_config(config, methods.method_options(config))
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
      np.asarray(syn["images"]), np.asarray(syn["labels"]), np.asarray(synthetic.targets_of(syn)),
      synthetic.synthetic_lr(syn, config.evaluate), config.evaluate.epochs, config.distill.ipc,
      config.method)
  return evaluate_lib.evaluate_set(evaluate_lib.Protocol.from_config(config), data, labelled,
                                   seed=config.seed, mesh=mesh, split="validation")
