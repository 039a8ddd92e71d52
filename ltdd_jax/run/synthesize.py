"""The statistics-matching stages (`method=unilevel`): observer and teacher, then synthesis.

`stage_observers` trains the observer and the teacher (two batch-norm networks, one program,
`methods.observer`) in `<expert root>/observers_<fingerprint>`, resumable by epoch;
`stage_synthesize` recalibrates both per class (`methods.statistics`), starts from teacher-scored
real crops and recovers the images (`methods.unilevel`; in a group and a within-group stage under
`+hierarchical`), checkpointed in `<workdir>/distill_ckpt`, and labels them with the teacher's
logits. `teacher_class_features` serves the similarity grouping of this family.
"""

from __future__ import annotations

import hashlib
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from ltdd_jax import checkpoints, interrupts, models, reporting
from ltdd_jax.core import ensemble
from ltdd_jax.methods import experts, observer, statistics, synthetic, unilevel
from ltdd_jax.run import context as context_lib
from ltdd_jax.run import locks, resume
from ltdd_jax.run import specs as specs_lib


def observer_directory(ctx: context_lib.RunContext):
  """`<expert root>/observers_<fingerprint of the observer settings>`: runs whose observers
  would be the same share them."""
  values = resume.stage_values(ctx.config, "observers")
  digest = hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:8]
  return ctx.expert_root / f"observers_{digest}"


def stage_observers(ctx: context_lib.RunContext) -> tuple[models.Classifier, dict]:
  """Trains (or resumes, or opens) the observer (network 0) and the teacher (network 1).

  Returns:
    (the observers as a plain classifier (backbone + head), their stacked parameters [2, ...]).
  """
  recipe, spec = specs_lib.observer_recipe(ctx.config, ctx.data)
  directory = observer_directory(ctx)
  labelling = experts.Labelling(ctx.data.num_classes)
  start = time.time()
  trained = not (directory / "meta.json").exists()
  with locks.held(directory, "observers"):
    resume.claim(ctx.config, directory, "observers")
    expert_set = experts.train_experts(recipe, labelling, ctx.data.train_images,
                                       ctx.data.train_labels, directory, ctx.mesh)
  if trained:
    ctx.metrics.write("observers", expert_set.epochs, seconds=time.time() - start)
  classifier = observer.as_classifier(recipe.model, spec)
  return classifier, expert_set.at_epoch(-1)


def calibrated(ctx: context_lib.RunContext, classifier, params, k: int):
  """Network k's parameters (backbone + head), its per-class statistics and the stored-statistics
  classifier normalising with their balanced target, with its `batch_stats`."""
  own = {name: jax.tree.map(lambda x: x[k], params[name]) for name in ("backbone", "head")}
  stats = statistics.class_statistics(classifier, own, ctx.data.train_images,
                                      ctx.data.train_labels, ctx.data.num_classes,
                                      ctx.config.unilevel.recalibration_batch)
  stored = models.with_stored_stats(classifier)
  return own, stats, stored, stats.batch_stats(stored, ctx.data.image_shape)


def teacher_class_features(ctx: context_lib.RunContext) -> np.ndarray:
  """[C, F] mean backbone features of every class under the recalibrated teacher (what the
  similarity grouping compares for a statistics-matching run, which has no experts)."""
  classifier, params = stage_observers(ctx)
  own, _, stored, batch_stats = calibrated(ctx, classifier, params, 1)
  features = jax.jit(lambda x: stored.apply({"params": own, "batch_stats": batch_stats}, x,
                                            method=lambda module, x: module.backbone(x)))
  feats = ensemble.batched(features, ctx.data.train_images)
  labels = ctx.data.train_labels
  return np.stack([feats[labels == c].mean(0) for c in range(ctx.data.num_classes)])


def stage_synthesize(ctx: context_lib.RunContext,
                     grouped: unilevel.GroupedSynthesis | None = None) -> synthetic.DistilledSet:
  """Observers (if missing), recalibration, initialisation and synthesis (the `+hierarchical`
  objective with `grouped`); returns the set, labelled with the teacher's logits."""
  config, data = ctx.config, ctx.data
  classifier, params = stage_observers(ctx)
  start = time.time()
  obs_params, obs_stats, stored, obs_bs = calibrated(ctx, classifier, params, 0)
  teacher_params, _, _, teacher_bs = calibrated(ctx, classifier, params, 1)
  teacher = lambda x: stored.apply({"params": teacher_params, "batch_stats": teacher_bs}, x)
  moments = lambda x: statistics.image_moments(stored, obs_params, x, obs_bs)
  spec = specs_lib.synthesis_spec(config)
  teacher_fn = jax.jit(teacher)
  accuracy = (float((ensemble.batched(teacher_fn, data.val_images).argmax(-1) == data.val_labels).mean()
                     * 100) if len(data.val_labels) else None)
  ctx.metrics.write_once("observers_recalibrated", 0, teacher_val_acc=accuracy)
  directory = ctx.workdir / "distill_ckpt"
  resume.claim(config, directory, "distill")
  store = checkpoints.Checkpoints(directory, max_to_keep=1)
  images, labels = unilevel.initial_images(spec, teacher_fn, data.train_images, data.train_labels,
                                           data.num_classes)
  tx = unilevel.optimizer(spec)
  state = {"images": images, "opt_state": tx.init(jnp.asarray(images))}
  first = store.latest_step() or 0
  if first:
    state = store.restore(first, state)
  step = unilevel.synthesis_step(spec, teacher, moments, obs_stats, grouped)
  pixels, opt_state = jnp.asarray(state["images"]), state["opt_state"]
  key = jax.random.key(spec.seed)
  every = max(1, config.distill.checkpoint_every)
  progress = reporting.Progress("synthesize", spec.iterations, start=first)
  with interrupts.safe_points():
    for it in range(first, spec.iterations):
      pixels, opt_state, loss = step(pixels, opt_state, jax.random.fold_in(key, it),
                                     jnp.asarray(labels))
      done = it + 1
      if done % config.distill.log_every == 0 or done == spec.iterations:
        ctx.metrics.write("synthesize", done, loss=float(loss))
      progress.update(done, f"loss {float(loss):.4f}")
      if done % every == 0 or done == spec.iterations or interrupts.requested():
        store.save(done, {"images": pixels, "opt_state": opt_state})
      if done < spec.iterations:
        interrupts.check(f"synthesis iteration {done}/{spec.iterations}")
  logits = ensemble.batched(teacher_fn, np.asarray(pixels))
  syn = synthetic.DistilledSet(
      np.asarray(pixels, np.float32), labels, np.asarray(config.evaluate.lr, np.float32),
      label_logits=logits.astype(np.float32),
      soft_labels=np.asarray(jax.nn.softmax(jnp.asarray(logits)), np.float32))
  ctx.metrics.write_once("distill_done", spec.iterations, seconds=time.time() - start)
  return syn
