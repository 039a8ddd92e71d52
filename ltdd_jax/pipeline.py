"""Stages a run is made of, each resumable, and the end-to-end pipeline the launchers call.

  experts   -> <workdir>/experts/flat (and flat_classifier for LTDD's ED)
  distill   -> <workdir>/synthetic.npz, synthetic.png, distill_ckpt/
  evaluate  -> <workdir>/report.json, report_per_class.png
`setup` writes the resolved config once its checks pass; every stage appends to
<workdir>/metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time

import jax
import numpy as np
from absl import logging

from ltdd_jax import checks, distill, errors, hierarchical, parallel, reporting, resume
from ltdd_jax import context as context_lib
from ltdd_jax import methods, selection, synthetic
from ltdd_jax import grouping as grouping_lib
from ltdd_jax import evaluate as evaluate_lib
from ltdd_jax import experts as experts_lib
from ltdd_jax import models
from ltdd_jax.data import dataset as dataset_lib

BASELINES = checks.BASELINES


parse_method = checks.parse_method


def setup(config, workdir, data=None, check_resume: bool = True) -> context_lib.RunContext:
  """Common start of every run: checks, multi-host init, compilation cache, dataset, mesh.

  Everything that can be checked before work starts is checked here, in this order: the config
  alone, the workdir (a folder we can write to, with room), the stage outputs already in it
  (made with the same config values, `resume.check_workdir`), then what needs the data (IPC against
  class sizes, manual groups). `config.json` is written only after every check passed.

  `data` (from `load_dataset(config.data, config.seed)`) skips loading when a caller running many
  cells on the same data (the benchmark grid) already holds it. `check_resume=False` skips the
  early check of stage records, for commands that resume nothing (evaluating a set); a stage that
  opens an expert set still checks its record.

  Returns:
    The `RunContext` every stage takes.
  """
  checks.check_config(config)
  workdir = resume.prepare_workdir(workdir)
  if check_resume:
    resume.check_workdir(config, workdir, context_lib.expert_root(config, workdir))
  parallel.initialize_distributed(config.mesh.distributed)
  parallel.use_compilation_cache(config.mesh.compilation_cache_dir)
  mesh = parallel.make_mesh(config.mesh.num_devices)
  if data is None:
    data = dataset_lib.load_dataset(config.data, config.seed)
  checks.check_with_data(config, data.counts)
  reporting.write_config(workdir, config)
  return context_lib.RunContext(config, workdir, data, mesh)


def stage_experts(ctx: context_lib.RunContext):
  """Trains (or resumes) the flat expert set, plus classifier experts when the method needs them.

  Returns:
    (expert set, classifier expert set or None).
  """
  config, data = ctx.config, ctx.data
  start = time.time()
  directory = ctx.expert_root / "flat"
  trained = not (directory / "meta.json").exists()
  expert_set = experts_lib.train_experts(config, data, directory, ctx.mesh)
  classifier_set = None
  base, _ = parse_method(config.method)
  if base in methods.METHODS and methods.method_options(config).ed:
    classifier_set = experts_lib.classifier_experts(config, data, expert_set, ctx.mesh)
  if trained:  # One line per training, not per resume that finds the set finished.
    ctx.metrics.write("experts", expert_set.epochs, seconds=time.time() - start)
  return expert_set, classifier_set


def expert_validation_accuracy(ctx: context_lib.RunContext,
                               expert_set: experts_lib.ExpertSet) -> dict:
  """Validation accuracy (%) of every expert at its last epoch: {mean, std, per_expert}."""
  data = ctx.data
  if not len(data.val_labels):
    return {}
  model = models.make_classifier(ctx.config.model, expert_set.num_classes)
  logits = evaluate_lib.Protocol.from_config(ctx.config).logits(model, expert_set.at_epoch(),
                                                                data.val_images)
  acc = 100.0 * (logits.argmax(-1) == data.val_labels[None]).mean(axis=1)
  return {"mean": float(acc.mean()), "std": float(acc.std()), "per_expert": acc.tolist()}


def class_mean_features(model_config, data, expert_set: experts_lib.ExpertSet) -> np.ndarray:
  """[C, F] mean backbone features of every class under expert 0's last epoch."""
  feats = expert_features(model_config, data, expert_set)
  return np.stack([feats[data.train_labels == c].mean(0) for c in range(data.num_classes)])


def expert_features(model_config, data, expert_set: experts_lib.ExpertSet) -> np.ndarray:
  """[N, F] backbone features of the LT training images under expert 0's last epoch."""
  model = models.make_classifier(model_config, expert_set.num_classes)
  last = expert_set.load_epoch(0, expert_set.epochs)
  backbone = models.for_inference(model).backbone
  fn = jax.jit(lambda p, x: backbone.apply({"params": p["backbone"]}, x))
  return np.concatenate([np.asarray(fn(last, data.train_images[i:i + 1000]))
                         for i in range(0, len(data.train_images), 1000)])


def stage_grouping(ctx: context_lib.RunContext) -> grouping_lib.Grouping:
  """The run's class grouping (saved as grouping.json; similarity uses the flat experts)."""
  config, data = ctx.config, ctx.data
  features = None
  if config.grouping.strategy == "similarity":
    expert_set, _ = stage_experts(ctx)
    features = class_mean_features(config.model, data, expert_set)
  grouping = grouping_lib.make_grouping(config.grouping, data.counts, config.seed, features)
  grouping.save(ctx.workdir / "grouping.json")
  return grouping


def stage_distill(ctx: context_lib.RunContext) -> dict:
  """Experts (if missing), then distillation (flat, or hierarchical for `+hierarchical`);
  writes synthetic.npz and the PNG grid."""
  config, data, workdir = ctx.config, ctx.data, ctx.workdir
  _, plugins = parse_method(config.method)
  expert_set, classifier_set = stage_experts(ctx)
  start = time.time()
  init, label_record = synthetic.initial_synthetic(config, data, expert_set, classifier_set)
  log_label_init(ctx.metrics, label_record)
  if "hierarchical" in plugins:
    grouping = stage_grouping(ctx)
    objectives, weights = hierarchical.hierarchical_objectives(
        config, data, grouping, ctx.expert_root, ctx.mesh)
  else:
    objectives = [distill.flat_objective(config, data, expert_set, classifier_set)]
    weights = [1.0]
  ctx.metrics.write_once(
      "objectives", 0, names=[o.name for o in objectives], weights=weights,
      syn_steps=[o.syn_steps or config.distill.syn_steps for o in objectives],
      expert_decoupling=[o.classifier_experts is not None for o in objectives])
  resume.claim(config, workdir / "distill_ckpt", "distill")
  syn = distill.run_distillation(config, data, objectives, weights, init, workdir, ctx.mesh)
  synthetic.save_synthetic(workdir, syn, data, config, [o.name for o in objectives], label_record)
  ctx.metrics.write_once("distill_done", config.distill.iterations, seconds=time.time() - start)
  return syn


def log_label_init(metrics: reporting.MetricsWriter, record: dict) -> None:
  """Writes the soft labels' initial per-class record to metrics.jsonl, and warns about classes
  whose images no labelling expert classifies correctly (their labels start class-correct)."""
  if not record:
    return
  metrics.write_once("label_init", 0, **{k: np.asarray(v).tolist() for k, v in record.items()})
  short = np.flatnonzero(record["init_expert_correct"] < 1)
  if len(short):
    logging.warning("Soft-label init: classes %s have images that no labelling expert classifies "
                    "correctly (share with expert labels: %s); those start from a class-correct "
                    "target instead.", short.tolist(),
                    np.round(record["init_expert_correct"][short], 2).tolist())


def baseline_set(ctx: context_lib.RunContext, base: str) -> evaluate_lib.LabelledSet:
  """A baseline's labelled set: the full LT set, or a random or herding selection."""
  config, data = ctx.config, ctx.data
  ev = config.evaluate
  if base == "full":
    return evaluate_lib.LabelledSet(data.train_images, data.train_labels, data.train_labels,
                                    ev.full_lr, ev.full_epochs, None, base)
  ipc = config.distill.ipc
  if base == "random":
    idx = selection.random_selection(data.train_labels, data.num_classes, ipc, config.seed,
                                     config.distill.allow_duplicates)
  elif base == "herding":
    expert_set, _ = stage_experts(ctx)
    feats = expert_features(config.model, data, expert_set)
    idx = selection.herding_selection(feats, data.train_labels, data.num_classes, ipc,
                                      config.distill.allow_duplicates)
  else:
    raise errors.InputError(f"Unknown baseline {base!r}; accepted: {BASELINES}.")
  labels = data.train_labels[idx]
  return evaluate_lib.LabelledSet(data.train_images[idx], labels, labels, ev.lr, ev.epochs, ipc,
                                  base)


def synthetic_set(ctx: context_lib.RunContext, path) -> evaluate_lib.LabelledSet:
  """A distilled set (synthetic.npz, validated on load) as evaluation consumes it: soft labels as
  targets when it has them, its learned lr (one per objective for hierarchical sets)."""
  config, data = ctx.config, ctx.data
  syn = synthetic.load_synthetic(path, data.num_classes, data.image_shape)
  images, labels = syn["images"], syn["labels"]
  return evaluate_lib.LabelledSet(
      images, labels, syn["soft_labels"] if "soft_labels" in syn else labels,
      synthetic.synthetic_lr(syn, config.evaluate), config.evaluate.epochs,
      int(len(images) // data.num_classes), config.method,
      synthetic.synthetic_lrs(syn, config.evaluate))


def report_name(method: str, which: str, split: str) -> str:
  """`report` for the run's own set (the synthetic set, or the baseline the method names), else
  `report_<set>`, so evaluating random, herding and full in one workdir keeps every report;
  `validation_` in front for the validation split."""
  own = which.startswith("synthetic") or which == parse_method(method)[0]
  name = "report" if own else f"report_{which}"
  return name if split == "test" else f"validation_{name}"


def stage_evaluate(ctx: context_lib.RunContext, which: str = "synthetic",
                   two_stage: bool = False, split: str = "test") -> dict:
  """Evaluates a set and writes report.json + report_per_class.png (validation_report.* when
  `split` is `validation`).

  Args:
    ctx: the run.
    which: `synthetic` (<workdir>/synthetic.npz), `synthetic:PATH`, `random`, `herding` or `full`.
    two_stage: evaluate with the two-stage classifier (grouping from the config).
    split: `test` (reported numbers) or `validation` (model selection and tuning).
  """
  config, data = ctx.config, ctx.data
  start = time.time()
  if which.startswith("synthetic"):
    _, _, path = which.partition(":")
    train_set = synthetic_set(ctx, path or ctx.workdir / "synthetic.npz")
  elif which in BASELINES:
    train_set = baseline_set(ctx, which)
  else:
    raise errors.InputError(f"--set={which!r}: accepted synthetic, synthetic:PATH, {', '.join(BASELINES)}.")
  protocol = evaluate_lib.Protocol.from_config(config)
  name = report_name(config.method, which, split)
  saved_state = ctx.workdir / "evaluate_ckpt" / name  # Resumes an interrupted evaluation.
  if two_stage:
    grouping = stage_grouping(ctx)
    report = hierarchical.evaluate_two_stage(
        protocol, hierarchical.TwoStageSpec.from_config(config.grouping), data, grouping,
        dataclasses.replace(train_set, method=config.method), seed=config.seed, mesh=ctx.mesh,
        split=split, checkpoint_dir=saved_state)
  else:
    report = evaluate_lib.evaluate_set(protocol, data, train_set, seed=config.seed, mesh=ctx.mesh,
                                       split=split, checkpoint_dir=saved_state)
  report["wall_seconds"] = time.time() - start
  if train_set.ipc is not None:  # Classes whose real images had to be repeated to reach the IPC.
    report["repeated_classes"] = checks.short_classes(data.counts, train_set.ipc)
  evaluate_lib.write_report(ctx.workdir, report, data.counts, name)
  if jax.process_index() == 0:  # One process removes what every process saved into.
    shutil.rmtree(saved_state, ignore_errors=True)
    with contextlib.suppress(OSError):  # evaluate_ckpt/ itself, once no evaluation is under way
      saved_state.parent.rmdir()
  ctx.metrics.write("evaluate", 0, method=train_set.method, split=split,
                    test_acc_mean=report["test_acc_mean"], test_acc_std=report["test_acc_std"])
  return report


def run_pipeline(config, workdir, data=None) -> dict:
  """The main job: experts -> distillation -> evaluation -> report (or a baseline's evaluation).

  `data`: the loaded dataset of `config.data` when the caller already has it (see `setup`)."""
  start = time.time()
  ctx = setup(config, workdir, data)
  base, plugins = parse_method(config.method)
  # Hierarchical distillation is always evaluated with the two-stage classifier.
  two_stage = bool(plugins)
  if base in BASELINES:
    report = stage_evaluate(ctx, base, two_stage)
  else:
    stage_distill(ctx)
    report = stage_evaluate(ctx, "synthetic", two_stage)
  report["wall_seconds"] = time.time() - start
  report["stage"] = "pipeline"
  evaluate_lib.write_report(ctx.workdir, report, ctx.data.counts)
  return report
