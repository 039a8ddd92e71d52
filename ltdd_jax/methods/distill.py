"""The distillation loop (DESIGN §4): synthetic images, lr and labels learned by trajectory matching.

Methods (`methods.registry`): `mtt` (images + lr), `datm` (+ soft labels from expert logits,
growing start-epoch window), `ltdd` (DATM options + class-frequency-weighted inner loss (DAM) +
backbone/classifier decoupled matching against classifier-only experts (ED)). The loss itself is a
`MatchingObjective`, so the two-stage hierarchical plugin can combine several of them over the same
synthetic images. The synthetic set's initial state and its file are `methods.synthetic`'s.

Resumable: the state (images, lr, labels, optimiser states) is checkpointed with orbax every
`checkpoint_every` iterations; the PRNG key and the expert drawn at iteration i are functions of
(seed, i), so a resumed run is bitwise the same as an uninterrupted one.
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

from ltdd_jax import checkpoints, errors, interrupts, parallel, reporting
from ltdd_jax.core import ensemble, matching
from ltdd_jax.methods import experts as experts_lib
from ltdd_jax.methods import synthetic


class DivergenceError(errors.DivergedError):
  """The matching loss or the synthetic set became NaN/Inf."""


# ----------------------------------------------------------------------------------------------
# Specs.


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


@dataclasses.dataclass(frozen=True)
class StartWindow:
  """Where start epochs are drawn: [min_start, max_start) throughout, or (`grows`, DATM) from
  [min_start, initial_max_start) growing by one epoch every `grow_every` iterations up to
  max_start (DATM draws from [min_start, upper) either way)."""
  max_start: int
  grows: bool = False
  min_start: int = 0
  initial_max_start: int = 2
  grow_every: int = 50

  def at(self, iteration: int) -> tuple[int, int]:
    """[lo, hi) of start epochs at an iteration."""
    if not self.grows:
      return self.min_start, self.max_start
    grown = self.initial_max_start + iteration // max(1, self.grow_every)
    return self.min_start, max(self.min_start + 1, min(self.max_start, grown))


@dataclasses.dataclass(frozen=True)
class DistillSpec:
  """The outer optimisation of one distillation (`config.distill`, `config.datm`).

  Attributes:
    iterations: outer iterations.
    expert_epochs: M, the epochs between a start and its target.
    window: where start epochs are drawn.
    inner: the student's inner training (`matching.InnerSpec`).
    lr_img, momentum: SGD on the images (and the lr).
    lr_lr: MTT's step on the lr itself (the log-lr's step is lr_lr / syn_lr_init^2).
    syn_lr_init: the student's initial lr.
    label_lr, label_momentum: SGD on the soft labels' logits (None: hard labels, not learned).
    lr_per_objective: several objectives each learn their own lr.
    seed: the PRNG seed of iteration i's draws is (seed, i).
    checkpoint_every, log_every: iterations between checkpoints / metrics lines.
    eval_every: iterations between validation evaluations (0: none).
  """
  iterations: int
  expert_epochs: int
  window: StartWindow
  inner: matching.InnerSpec
  lr_img: float = 100.0
  lr_lr: float = 1e-5
  syn_lr_init: float = 0.01
  momentum: float = 0.5
  label_lr: float | None = None
  label_momentum: float = 0.9
  lr_per_objective: bool = True
  seed: int = 0
  checkpoint_every: int = 50
  log_every: int = 10
  eval_every: int = 0


# ----------------------------------------------------------------------------------------------
# Matching objectives: one expert set (or a pair for ED), its sampling rule and its loss.


@dataclasses.dataclass(frozen=True, eq=False)
class ExpertSource:
  """What one objective matches against.

  Attributes:
    experts: the expert set.
    classifier_experts: its classifier-only experts for LTDD's ED, or None (the whole network is
      matched against `experts`).
    label_map: [C] dataset class -> this objective's output (-1: not its class). Identity for flat
      distillation; group ids or within-group ids for the hierarchical plugin.
    counts: [outputs] training images per output (DAM weights).
    sampling: how the experts drew their images (`instance`, `class_balanced` or `by_class`): the
      DAM weights follow the distribution the experts trained on (`matching.sampled_class_counts`).
    image_index: which synthetic images the student trains on (None: all), e.g. a group's.
    name: what the objective matches (`flat`; `groups` and `group_<g>` for the hierarchical
      stages): names its learned lr when every objective learns its own.
    classes_per_output: [outputs] dataset classes behind each output (`by_class` sampling).
  """
  experts: experts_lib.ExpertSet
  classifier_experts: experts_lib.ExpertSet | None
  label_map: np.ndarray
  counts: np.ndarray
  sampling: str = "instance"
  image_index: np.ndarray | None = None
  name: str = "flat"
  classes_per_output: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class MatchingOptions:
  """What every objective of a run shares: the student's inner training, whether DAM weighs its
  inner loss, and how ED's two terms are drawn and weighed (for sources with classifier experts)."""
  inner: matching.InnerSpec
  dam: bool = False
  ed: EDSpec = EDSpec()


@dataclasses.dataclass(frozen=True, eq=False)
class MatchingObjective:
  """A source of (start, target) expert pairs and the matching loss against them.

  Attributes:
    experts: `experts.TrajectoryReader` of the expert set; `.get(k, epoch)` -> parameters.
    student: the `matching.Student` unrolled against them (its inner spec, DAM weights, mesh).
    label_map, num_outputs, image_index, name: as `ExpertSource` says.
    classifier_experts: classifier-only trajectories for LTDD's ED (or None).
    ed: how the classifier term is drawn and weighed under ED.
    weight: the objective's weight in the total loss (the hierarchical lambdas).
  """
  experts: Any
  student: matching.Student
  label_map: np.ndarray
  num_outputs: int
  image_index: np.ndarray | None = None
  classifier_experts: Any = None
  ed: EDSpec = EDSpec()
  weight: float = 1.0
  name: str = "flat"

  @property
  def num_experts(self) -> int:
    return self.experts.num_experts

  @property
  def num_epochs(self) -> int:
    return self.experts.num_epochs

  @property
  def syn_steps(self) -> int:
    return self.student.spec.syn_steps

  @property
  def num_classifier_epochs(self) -> int:
    return self.classifier_experts.num_epochs

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

  def loss(self, syn: dict, pair: dict, key: jax.Array) -> jax.Array:
    """The matching loss of this objective on its images, with labels mapped to its outputs.

    Args:
      syn: {images [N, H, W, C], targets [N] or [N, C] over the dataset's classes, lr (scalar)}.
      pair: what `sample` drew.
      key: PRNG key.
    """
    images, targets = syn["images"], syn["targets"]
    if self.image_index is not None:
      images, targets = images[self.image_index], targets[self.image_index]
    mapped = jnp.asarray(self.label_map)
    if targets.ndim == 1:
      local_targets = mapped[targets]
    else:  # Soft labels: the probability mass of the classes mapping to each output, renormalised.
      onehot = jax.nn.one_hot(mapped, self.num_outputs) * (mapped >= 0)[:, None]
      local_targets = targets @ onehot
      local_targets = local_targets / jnp.maximum(local_targets.sum(-1, keepdims=True), 1e-12)
    local = {"images": images, "targets": local_targets, "lr": syn["lr"]}
    if "cls_start" not in pair:
      return matching.trajectory_matching_loss(self.student, local, pair, key, "all")
    backbone = matching.trajectory_matching_loss(self.student, local, pair, key, "backbone")
    head_student = dataclasses.replace(
        self.student,
        spec=dataclasses.replace(self.student.spec,
                                 train_part="head" if self.ed.freeze_backbone else "all"),
        class_weights=self.student.class_weights if self.ed.dam else None)
    head = matching.trajectory_matching_loss(
        head_student, local, {"start": pair["cls_start"], "target": pair["cls_target"]},
        jax.random.fold_in(key, 1), "head")
    return self.ed.backbone_weight * backbone + self.ed.classifier_weight * head


def make_objective(source: ExpertSource, options: MatchingOptions, mesh=None, weight: float = 1.0,
                   syn_steps: int | None = None) -> MatchingObjective:
  """The objective matching `source` with the run's options (`syn_steps`: this objective's own
  unroll, e.g. the hierarchical stage 2's step-matched one; None: `options.inner.syn_steps`)."""
  num_outputs = source.experts.num_classes
  inner = options.inner if syn_steps is None else dataclasses.replace(options.inner,
                                                                      syn_steps=syn_steps)
  weights = None
  if options.dam:
    weights = jnp.asarray(matching.class_frequency_weights(
        matching.sampled_class_counts(source.counts, source.sampling,
                                      source.classes_per_output)))
  student = matching.Student(ensemble.make_apply(source.experts.model), inner, weights, mesh)
  classifier = source.classifier_experts
  return MatchingObjective(
      experts=experts_lib.TrajectoryReader(source.experts), student=student,
      label_map=np.asarray(source.label_map), num_outputs=num_outputs,
      image_index=source.image_index,
      classifier_experts=None if classifier is None else experts_lib.TrajectoryReader(classifier),
      ed=options.ed, weight=weight, name=source.name)


# ----------------------------------------------------------------------------------------------
# The outer optimisation.


def make_optimizers(spec: DistillSpec) -> dict[str, optax.GradientTransformation]:
  """SGD with momentum for images and lr (`distill.momentum`) and soft labels
  (`datm.label_momentum`, DATM's and LTDD's `Momentum_y`).

  The lr is learned as log(lr); `lr_lr` keeps its MTT meaning (a step on lr itself), so the
  log-space step size is lr_lr / syn_lr_init^2, which makes the first update equal MTT's.
  """
  opts = {"images": optax.sgd(spec.lr_img, momentum=spec.momentum),
          "log_lr": optax.sgd(spec.lr_lr / spec.syn_lr_init**2, momentum=spec.momentum)}
  if spec.label_lr is not None:
    opts["label_logits"] = optax.sgd(spec.label_lr, momentum=spec.label_momentum)
  return opts


def make_update_fn(spec: DistillSpec, objectives: list[MatchingObjective]):
  """jit(update)(syn, opt_state, pairs, key) -> (syn, opt_state, loss, losses).

  The loss is sum_i objective_i.weight * objective_i.loss; gradients flow to every learnable leaf
  of syn.
  """
  opts = make_optimizers(spec)
  learnable = tuple(opts)

  def total_loss(learn, fixed, pairs, key):
    syn = {**fixed, **learn}
    targets = synthetic.targets_of(syn)
    syn_lr = jnp.exp(syn["log_lr"])  # One lr, or one per objective (lr_per_objective).
    losses = [obj.loss({"images": syn["images"], "targets": targets,
                        "lr": syn_lr[i] if syn_lr.ndim else syn_lr}, pair,
                       jax.random.fold_in(key, i))
              for i, (obj, pair) in enumerate(zip(objectives, pairs))]
    return sum(obj.weight * l for obj, l in zip(objectives, losses)), jnp.stack(losses)

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


def check_epochs(spec: DistillSpec, objectives: list[MatchingObjective]) -> None:
  """max_start_epoch + expert_epochs must fit inside every expert trajectory (and, under ED, the
  classifier window inside every classifier trajectory)."""
  max_start = spec.window.max_start
  need = max_start + spec.expert_epochs
  for obj in objectives:
    if need > obj.num_epochs:
      raise errors.InputError(
          f"distill.max_start_epoch ({max_start}) + expert_epochs ({spec.expert_epochs}) = {need} "
          f"exceeds the experts' {obj.num_epochs} epochs; lower them or train longer experts "
          "(experts.epochs).")
    if obj.classifier_experts is None:
      continue
    last = obj.ed.max_start_epoch - 1 + spec.expert_epochs
    if obj.ed.max_start_epoch < 1 or last > obj.num_classifier_epochs:
      raise errors.InputError(
          f"ltdd.classifier_max_start_epoch ({obj.ed.max_start_epoch}) must be >= 1 and, with "
          f"distill.expert_epochs ({spec.expert_epochs}), reach at most epoch "
          f"{obj.num_classifier_epochs} of the classifier experts; lower it or raise "
          "experts.classifier_epochs.")


def run_distillation(spec: DistillSpec, objectives: list[MatchingObjective], initial: dict,
                     checkpoint_dir, mesh, *, metrics: reporting.MetricsWriter | None = None,
                     validate: Callable[[dict], dict] | None = None) -> dict:
  """Runs (or resumes) the outer loop; returns the final synthetic state (host numpy).

  Args:
    spec: the `DistillSpec`.
    objectives: what the images are matched against (their weights sum into the loss).
    initial: the initial state (`synthetic.initial_synthetic`).
    checkpoint_dir: where the state is checkpointed and resumed from.
    mesh: device mesh.
    metrics: where `distill` (and `distill_validation`) records go.
    validate: synthetic state -> validation report (every `eval_every` iterations).

  Raises:
    DivergenceError: (keeping the last good checkpoint) when the loss or the images stop being
      finite.
  """
  check_epochs(spec, objectives)
  update, init_opt = make_update_fn(spec, objectives)
  syn = {k: jnp.asarray(v) for k, v in initial.items()}
  if spec.lr_per_objective and len(objectives) > 1:
    syn["log_lr"] = jnp.full((len(objectives),), syn["log_lr"])
  state = {"syn": syn, "opt": init_opt(syn)}
  store = checkpoints.Checkpoints(pathlib.Path(checkpoint_dir), max_to_keep=2)
  start = store.latest_step()
  if start is not None:
    state = jax.tree.map(jnp.asarray, store.restore(start, state))
  else:
    start = 0
    store.save(0, state)
  state = parallel.replicate(state, mesh)
  if metrics is not None:
    metrics.drop_after(("distill", "distill_validation"), start)
  progress = reporting.Progress("distill", spec.iterations, start)
  base = jax.random.key(spec.seed)
  t0 = time.time()

  def draw(it):  # The expert pairs of iteration `it`: a function of (seed, it) alone.
    rng = np.random.default_rng([spec.seed, it])
    lo, hi = spec.window.at(it)
    return [obj.sample(rng, lo, hi, spec.expert_epochs) for obj in objectives], (lo, hi)

  if start:
    progress.note(f"resuming from iteration {start}/{spec.iterations}")
  upcoming = draw(start) if start < spec.iterations else None
  with interrupts.safe_points():
    for it in range(start, spec.iterations):
      pairs, (lo, hi) = upcoming
      syn, opt, loss, losses = update(state["syn"], state["opt"], pairs,
                                      jax.random.fold_in(base, it))
      if it + 1 < spec.iterations:  # Read the next pairs from disk while this update computes.
        upcoming = draw(it + 1)
      loss = float(loss)
      if not np.isfinite(loss) or not bool(jnp.isfinite(syn["images"]).all()):
        last = store.latest_step()
        raise DivergenceError(
            f"Distillation diverged at iteration {it + 1}: matching loss {loss}. The last good "
            f"state is checkpoint {last} in {store.directory}. Lower distill.lr_img (now "
            f"{spec.lr_img}) or distill.lr_lr (now {spec.lr_lr}) and resume with the same "
            "--workdir, or start afresh.")
      state = {"syn": syn, "opt": opt}
      done = it + 1
      if metrics is not None and (done % spec.log_every == 0 or done == spec.iterations):
        metrics.write("distill", done, loss=loss, losses=np.asarray(losses).tolist(),
                      syn_lr=np.exp(np.asarray(syn["log_lr"])).tolist(), start_window=[lo, hi],
                      seconds=time.time() - t0)
      saved = done % spec.checkpoint_every == 0 or done == spec.iterations
      if saved:
        store.save(done, state)
      if validate and spec.eval_every and done % spec.eval_every == 0 and done < spec.iterations:
        report = validate(parallel.gather(syn))
        if metrics is not None:
          metrics.write("distill_validation", done, val_acc=report["val_acc_mean"],
                        val_acc_std=report["val_acc_std"])
      lrs = " ".join(f"{x:.4f}" for x in np.exp(np.atleast_1d(np.asarray(syn["log_lr"]))))
      progress.update(done, f"loss {loss:.4f} lr {lrs}")
      if done < spec.iterations:
        interrupts.check(f"distillation iteration {done}/{spec.iterations}",
                         save=None if saved else lambda: store.save(done, state))
  store.close()
  return parallel.gather(state["syn"])
