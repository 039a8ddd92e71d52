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
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ltdd_jax import checkpoints, matching, models, parallel, reporting, selection, training
from ltdd_jax import evaluate as evaluate_lib
from ltdd_jax import experts as experts_lib

METHODS = ("mtt", "datm", "ltdd")
PyTree = Any


class DivergenceError(FloatingPointError):
  """The matching loss or the synthetic set became NaN/Inf."""


@dataclasses.dataclass(frozen=True)
class MethodOptions:
  """Which option groups a method turns on (their hyperparameters live in the config)."""
  soft_labels: bool
  grow_window: bool
  dam: bool
  ed: bool


def method_options(config) -> MethodOptions:
  """mtt: none; datm: soft labels + growing window; ltdd: datm's + `ltdd.dam` / `ltdd.ed`."""
  method = config.method.split("+")[0]
  if method not in METHODS:
    raise ValueError(f"Unknown distillation method {method!r}; accepted: {METHODS}.")
  datm = method in ("datm", "ltdd")
  ltdd = method == "ltdd"
  return MethodOptions(soft_labels=datm, grow_window=datm, dam=ltdd and config.ltdd.dam,
                       ed=ltdd and config.ltdd.ed)


# ----------------------------------------------------------------------------------------------
# Matching objectives: one expert set (or a pair for ED), its sampling rule and its loss.


@dataclasses.dataclass
class MatchingObjective:
  """A source of (start, target) expert pairs and the matching loss against them.

  Attributes:
    experts: expert trajectories, leaves [K, E+1, ...] (host numpy).
    classifier_experts: classifier-only trajectories for LTDD's ED (or None).
    apply_fn: the student's (params, images) -> logits.
    label_map: [C] int mapping dataset classes to this objective's outputs (-1: not its class).
      Identity for flat distillation; group ids or within-group ids for the hierarchical plugin.
    num_outputs: outputs of this objective's networks.
    image_index: which synthetic images the student trains on (None: all), e.g. a group's.
    classifier_experts: classifier-only trajectories for LTDD's ED (or None).
    class_weights: [num outputs] DAM weights (or None).
    ed_lambda: weight of the classifier term under ED.
    name: what the objective matches (`flat`; `groups` and `group_<g>` for the hierarchical
      stages): names its learned lr when every objective learns its own.
  """
  experts: PyTree
  apply_fn: Callable
  label_map: np.ndarray
  num_outputs: int
  image_index: np.ndarray | None = None
  classifier_experts: PyTree | None = None
  class_weights: np.ndarray | None = None
  ed_lambda: float = 1.0
  name: str = "flat"

  @property
  def num_experts(self) -> int:
    return jax.tree.leaves(self.experts)[0].shape[0]

  @property
  def num_epochs(self) -> int:
    return jax.tree.leaves(self.experts)[0].shape[1] - 1

  def sample(self, rng: np.random.Generator, lo: int, hi: int, expert_epochs: int):
    """Draws an expert k and start epoch s in [lo, hi); returns the host arrays the loss needs."""
    k = int(rng.integers(self.num_experts))
    s = int(rng.integers(lo, hi))
    take = lambda tree, e: jax.tree.map(lambda x: x[k, e], tree)
    pair = {"start": take(self.experts, s), "target": take(self.experts, s + expert_epochs)}
    if self.classifier_experts is not None:
      ce = jax.tree.leaves(self.classifier_experts)[0].shape[1] - 1
      sc = int(rng.integers(0, max(1, ce - expert_epochs + 1)))
      pair["cls_start"] = take(self.classifier_experts, sc)
      pair["cls_target"] = take(self.classifier_experts, min(sc + expert_epochs, ce))
    return pair

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
    part = "backbone" if "cls_start" in pair else "all"
    loss = matching.trajectory_matching_loss(
        self.apply_fn, spec, dsa_config, images, local_targets, syn_lr, pair["start"],
        pair["target"], key, weights, mesh, part)
    if "cls_start" in pair:
      cls = matching.trajectory_matching_loss(
          self.apply_fn, spec, dsa_config, images, local_targets, syn_lr, pair["cls_start"],
          pair["cls_target"], jax.random.fold_in(key, 1), weights, mesh, "head")
      loss = loss + self.ed_lambda * cls
    return loss


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
      experts=expert_set.load_all(), apply_fn=training.make_apply(model),
      label_map=np.asarray(label_map), num_outputs=num_outputs, image_index=image_index,
      classifier_experts=classifier_set.load_all() if options.ed else None,
      class_weights=matching.class_frequency_weights(counts) if options.dam else None,
      ed_lambda=config.ltdd.ed_lambda, name=name)


def flat_objective(config, data, expert_set: experts_lib.ExpertSet,
                   classifier_set: experts_lib.ExpertSet | None) -> MatchingObjective:
  """The objective of flat (non-hierarchical) distillation against one expert set."""
  return make_objective(config, expert_set, classifier_set, np.arange(data.num_classes),
                        data.num_classes, data.counts)


# ----------------------------------------------------------------------------------------------
# Synthetic-set initialisation.


def initial_synthetic(config, data, expert_set: experts_lib.ExpertSet | None,
                      label_set: experts_lib.ExpertSet | None = None) -> dict:
  """Initial synthetic state: images [C*ipc, ...], log_lr, and label_logits when soft.

  Real init draws `ipc` training images per class (repeating the images of classes with fewer when
  `distill.allow_duplicates`); DATM's `correct_only` prefers images the labelling expert classifies
  correctly, and soft labels start from its logits. The labelling expert is `label_set` when given
  (LTDD: the class-balanced classifier expert, whose logits are not biased to the head) and
  `expert_set` otherwise (DATM).
  """
  cfg = config.distill
  options = method_options(config)
  ipc, num_classes = cfg.ipc, data.num_classes
  selection.check_ipc(data.train_labels, num_classes, ipc, cfg.allow_duplicates)
  labels = np.repeat(np.arange(num_classes), ipc).astype(np.int32)
  logits = None
  if options.soft_labels:
    source = label_set or expert_set
    if source is None:
      raise ValueError("Soft labels need an expert set to initialise them from.")
    epoch = config.datm.label_expert_epoch
    epoch = source.epochs if epoch < 0 or epoch > source.epochs else epoch
    params = jax.tree.map(lambda x: x[epoch:epoch + 1], source.load(0))
    model = models.make_classifier(config.model, num_classes)
    logits = training.model_logits(config, model, params, data.train_images)[0]
  if cfg.init == "real":
    if options.soft_labels and config.datm.correct_only:
      correct = logits.argmax(-1) == data.train_labels
      idx = []
      for c in range(num_classes):
        pool = np.flatnonzero((data.train_labels == c) & correct)
        pool = pool if len(pool) >= ipc else np.flatnonzero(data.train_labels == c)
        rng = np.random.default_rng([config.seed, c, 29])
        idx.append(rng.choice(pool, ipc, replace=len(pool) < ipc))
      idx = np.concatenate(idx)
    else:
      idx = selection.random_selection(data.train_labels, num_classes, ipc, config.seed,
                                       cfg.allow_duplicates)
    images = data.train_images[idx].copy()
  elif cfg.init == "noise":
    images = np.random.default_rng(config.seed).normal(
        size=(num_classes * ipc, *data.image_shape)).astype(np.float32)
    idx = None
  else:
    raise ValueError(f"distill.init must be 'real' or 'noise', got {cfg.init!r}.")
  state = {"images": images.astype(np.float32),
           "log_lr": np.float32(np.log(cfg.syn_lr_init)), "labels": labels}
  if options.soft_labels:
    if idx is None:  # Noise images: an expert's logits on them mean nothing; start near one-hot.
      state["label_logits"] = np.log(np.where(np.eye(num_classes)[labels] > 0, 0.9,
                                              0.1 / max(num_classes - 1, 1))).astype(np.float32)
    else:
      state["label_logits"] = logits[idx].astype(np.float32)
  return state


# ----------------------------------------------------------------------------------------------
# The outer optimisation.


def make_optimizers(config, options: MethodOptions) -> dict[str, optax.GradientTransformation]:
  """SGD with momentum for images, lr and (soft) labels.

  The lr is learned as log(lr); `distill.lr_lr` keeps its MTT meaning (a step on lr itself), so the
  log-space step size is lr_lr / syn_lr_init^2, which makes the first update equal MTT's.
  """
  cfg = config.distill
  opts = {"images": optax.sgd(cfg.lr_img, momentum=cfg.momentum),
          "log_lr": optax.sgd(cfg.lr_lr / cfg.syn_lr_init**2, momentum=cfg.momentum)}
  if options.soft_labels:
    opts["label_logits"] = optax.sgd(config.datm.lr_label, momentum=cfg.momentum)
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
                            remat_policy=config.distill.remat_policy)
  opts = make_optimizers(config, options)
  learnable = tuple(opts)

  def total_loss(learn, fixed, pairs, key):
    syn = {**fixed, **learn}
    targets = targets_of(syn)
    syn_lr = jnp.exp(syn["log_lr"])  # One lr, or one per objective (distill.lr_per_objective).
    losses = [obj.loss(spec, config.dsa, syn["images"], targets,
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


def start_epoch_window(config, options: MethodOptions, iteration: int) -> tuple[int, int]:
  """[lo, hi) of start epochs at an iteration; DATM's window grows to distill.max_start_epoch."""
  hi = config.distill.max_start_epoch
  if options.grow_window:
    grown = config.datm.initial_max_start_epoch + iteration // max(1, config.datm.window_grow_every)
    return config.datm.min_start_epoch, max(config.datm.min_start_epoch + 1, min(hi, grown))
  return 0, hi


def check_epochs(config, objectives: list[MatchingObjective]) -> None:
  """max_start_epoch + expert_epochs must fit inside every expert trajectory."""
  need = config.distill.max_start_epoch + config.distill.expert_epochs
  for obj in objectives:
    if need > obj.num_epochs:
      raise ValueError(
          f"distill.max_start_epoch ({config.distill.max_start_epoch}) + expert_epochs "
          f"({config.distill.expert_epochs}) = {need} exceeds the experts' {obj.num_epochs} epochs; "
          "lower them or train longer experts (experts.epochs).")


def run_distillation(config, data, objectives: list[MatchingObjective], weights: list[float],
                     init_syn: dict, workdir, mesh=None) -> dict:
  """Runs (or resumes) the outer loop; returns the final synthetic state (host numpy).

  Writes `<workdir>/distill_ckpt/` checkpoints and appends to `metrics.jsonl`. Raises
  `DivergenceError` (keeping the last good checkpoint) when the loss or the images stop being finite.
  """
  cfg = config.distill
  workdir = pathlib.Path(workdir)
  mesh = mesh or parallel.make_mesh(config.mesh.num_devices)
  options = method_options(config)
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
  progress = reporting.Progress("distill", cfg.iterations, start)
  base = jax.random.key(config.seed)
  t0 = time.time()
  for it in range(start, cfg.iterations):
    rng = np.random.default_rng([config.seed, it])
    lo, hi = start_epoch_window(config, options, it)
    pairs = [obj.sample(rng, lo, hi, cfg.expert_epochs) for obj in objectives]
    syn, opt, loss, losses = update(state["syn"], state["opt"], pairs,
                                    jax.random.fold_in(base, it))
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


def validate(config, data, syn: dict, mesh=None) -> dict:
  """Evaluates a synthetic state on the validation split (model selection; never test)."""
  return evaluate_lib.evaluate_set(
      config, data, syn["images"], np.asarray(targets_of(syn)), synthetic_lr(config, syn),
      config.evaluate.epochs, method=config.method, ipc=config.distill.ipc, mesh=mesh,
      split="validation")


def synthetic_lr(config, syn: dict) -> float:
  """The evaluation lr of a synthetic set: the learned one, or evaluate.lr when told not to use it.

  A set distilled with one lr per objective (hierarchical) and evaluated by one flat network gets
  their geometric mean; the two-stage classifier uses each network's own (`synthetic_lrs`)."""
  if not config.evaluate.use_learned_lr:
    return config.evaluate.lr
  return float(np.exp(np.mean(syn["log_lr"])))


def synthetic_lrs(config, syn: dict) -> dict[str, float]:
  """Objective name -> learned lr of a set distilled with one lr per objective ({} otherwise)."""
  if not config.evaluate.use_learned_lr or "lr_objectives" not in syn:
    return {}
  return {str(n): float(v) for n, v in zip(syn["lr_objectives"], np.exp(syn["log_lr"]))}


def save_synthetic(workdir, syn: dict, data, config, objective_names=()) -> pathlib.Path:
  """Writes `synthetic.npz` (model-space and pixel-space images, labels, soft labels, lr) and the
  PNG grid `synthetic.png`. With one lr per objective, `lr` is a vector and `lr_objectives` (from
  `objective_names`) names its entries."""
  workdir = pathlib.Path(workdir)
  pixels = data.preprocessor.invert(syn["images"])
  lr = np.exp(np.asarray(syn["log_lr"], np.float32))
  out = {"images": syn["images"], "pixels": pixels, "labels": syn["labels"], "lr": lr}
  if lr.ndim:
    if len(objective_names) != len(lr):
      raise ValueError(f"{len(lr)} learned lrs but objective names {list(objective_names)}.")
    out["lr_objectives"] = np.asarray(objective_names, dtype=str)
  if "label_logits" in syn:
    out["label_logits"] = syn["label_logits"]
    out["soft_labels"] = np.asarray(matching.soft_targets(jnp.asarray(syn["label_logits"])))
  path = workdir / "synthetic.npz"
  workdir.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(path, **out)
  lo, hi = np.percentile(pixels, [1, 99])
  reporting.image_grid((pixels - lo) / max(hi - lo, 1e-6), syn["labels"], workdir / "synthetic.png",
                       per_class=min(config.distill.ipc, 10),
                       title=f"{config.method} synthetic set, IPC {config.distill.ipc}")
  return path


def load_synthetic(path) -> dict:
  """Reads `synthetic.npz` back: images (model space), labels, lr and soft labels if present."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"No synthetic set at {path}; run distillation first "
                            "(python -m launch.distill ...).")
  with np.load(path) as f:
    out = {k: f[k] for k in f.files}
  out["log_lr"] = np.log(out["lr"])
  return out
