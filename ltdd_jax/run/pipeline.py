"""Stages a run is made of, each resumable, and the end-to-end pipeline the launchers call.

  experts   -> <expert root>/flat (and flat_classifier for LTDD's ED; the groups' for the plugin)
  distill   -> <workdir>/synthetic.npz, synthetic.png, distill_ckpt/
  evaluate  -> <workdir>/report.json, report_per_class.png
`setup` checks everything it can, builds the specs and writes the resolved config; every stage
appends to <workdir>/metrics.jsonl. The stages (with the benchmark and tuning drivers) are the
only readers of the config: below them every function takes a spec (`run.specs`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import time

import jax
import numpy as np
from absl import logging

from ltdd_jax import errors, parallel, reporting
from ltdd_jax.core import training
from ltdd_jax.data import dataset as dataset_lib
from ltdd_jax.evaluation import metrics as metrics_lib
from ltdd_jax.evaluation import protocol as protocol_lib
from ltdd_jax.evaluation import report as report_lib
from ltdd_jax.methods import distill, experts, hierarchical, registry, selection, synthetic
from ltdd_jax.methods import grouping as grouping_lib
from ltdd_jax.methods import rectify as rectify_lib
from ltdd_jax.methods import two_stage as two_stage_lib
from ltdd_jax.run import checks, locks, resume
from ltdd_jax.run import context as context_lib
from ltdd_jax.run import specs as specs_lib
from ltdd_jax.run import synthesize


def setup(config, workdir, data=None, stages=resume.STAGES) -> context_lib.RunContext:
  """Common start of every run: checks, specs, multi-host init, compilation cache, dataset, mesh.

  Everything that can be checked before work starts is checked here, in this order: the config
  alone, the workdir (a folder we can write to, with room), the stage outputs already in it
  (made with the same config values, `resume.check_workdir`), then what needs the data (IPC against
  class sizes, manual groups). `config.json` is written only after every check passed.

  `data` (from `load_dataset`) skips loading when a caller running many cells on the same data
  (the benchmark grid) already holds it. `stages`: the stages whose records are checked early,
  those the command reads or writes (evaluating a set: none; the grouping analysis: `experts`);
  a stage that opens an expert set still checks its record.

  Returns:
    The `RunContext` every stage takes.
  """
  checks.check_config(config)
  specs = specs_lib.Specs.from_config(config)
  workdir = resume.prepare_workdir(workdir)
  locks.acquire(workdir)  # Held for the process's life (a grid releases each cell's).
  resume.check_workdir(config, workdir, context_lib.expert_root(config, workdir), stages)
  parallel.initialize_distributed(config.mesh.distributed)
  parallel.use_compilation_cache(config.mesh.compilation_cache_dir)
  mesh = parallel.make_mesh(config.mesh.num_devices)
  if data is None:
    data = load_dataset(config)
  checks.check_with_data(config, data)
  reporting.write_json(workdir / "config.json", config.to_dict())
  return context_lib.RunContext(config, specs, workdir, data, mesh)


def load_dataset(config) -> dataset_lib.Dataset:
  """The dataset `config.data` names (DESIGN §1)."""
  return dataset_lib.load_dataset(specs_lib.data(config), config.seed)


# ----------------------------------------------------------------------------------------------
# Experts.


def train_expert_set(ctx: context_lib.RunContext, directory, labelling: experts.Labelling,
                     balance: training.Balance = training.Balance()) -> experts.ExpertSet:
  """Trains (or resumes, or opens) the expert set of `labelling` in `directory`, after checking
  its record against the config."""
  with locks.held(directory, "expert set"):  # Another run may be training the same set.
    resume.claim(ctx.config, directory, "experts")
    images, labels = labelling.apply(ctx.data.train_images, ctx.data.train_labels)
    balance, strata = training.over_classes(
        balance, labelling.kept_classes(ctx.data.train_labels), ctx.data.num_classes)
    recipe = experts.recipe(ctx.specs.experts, labels, labelling.num_classes, balance)
    return experts.train_experts(recipe, labelling, images, labels, directory, ctx.mesh,
                                 strata=strata)


def train_classifier_set(ctx: context_lib.RunContext,
                         expert_set: experts.ExpertSet) -> experts.ExpertSet:
  """LTDD's classifier experts of an expert set (trained, resumed or opened)."""
  directory = experts.classifier_directory(expert_set)
  with locks.held(directory, "expert set"):
    resume.claim(ctx.config, directory, "experts", classifier=True)
    return experts.train_classifier_experts(ctx.specs.experts, expert_set, ctx.data.train_images,
                                            ctx.data.train_labels, ctx.mesh)


def stage_experts(ctx: context_lib.RunContext):
  """Trains (or resumes) the flat expert set, plus classifier experts when the method needs them.

  Returns:
    (expert set, classifier expert set or None).
  """
  start = time.time()
  directory = ctx.expert_root / "flat"
  trained = not (directory / "meta.json").exists()
  expert_set = train_expert_set(ctx, directory, experts.Labelling(ctx.data.num_classes))
  classifier_set = train_classifier_set(ctx, expert_set) if ctx.method.options.ed else None
  if trained:  # One line per training, not per resume that finds the set finished.
    ctx.metrics.write("experts", expert_set.epochs, seconds=time.time() - start)
  return expert_set, classifier_set


def expert_validation_accuracy(ctx: context_lib.RunContext, expert_set: experts.ExpertSet) -> dict:
  """Validation accuracy (%) of every expert at its last epoch: {mean, std, per_expert}."""
  data = ctx.data
  if not len(data.val_labels):
    return {}
  logits = expert_set.logits(data.val_images, batch_size=ctx.specs.protocol.test_batch_size)
  acc = 100.0 * (logits.argmax(-1) == data.val_labels[None]).mean(axis=1)
  return {"mean": float(acc.mean()), "std": float(acc.std()), "per_expert": acc.tolist()}


def class_mean_features(data, expert_set: experts.ExpertSet) -> np.ndarray:
  """[C, F] mean backbone features of every class under expert 0's last epoch."""
  feats = expert_set.features(data.train_images)
  return np.stack([feats[data.train_labels == c].mean(0) for c in range(data.num_classes)])


def stage_grouping(ctx: context_lib.RunContext) -> grouping_lib.Grouping:
  """The run's class grouping (saved as grouping.json; similarity uses the flat experts, or a
  statistics-matching run's teacher)."""
  config, data = ctx.config, ctx.data
  features = None
  if config.grouping.strategy == "similarity":
    if ctx.method.base.kind == registry.STATISTICS:
      features = synthesize.teacher_class_features(ctx)
    else:
      expert_set, _ = stage_experts(ctx)
      features = class_mean_features(data, expert_set)
  grouping = grouping_lib.make_grouping(ctx.specs.grouping, data.counts, config.seed, features)
  path = ctx.workdir / "grouping.json"
  if ctx.method.has("hierarchical") and not path.exists():  # once per run, not at each stage
    note = grouping_lib.imbalanced_groups_note(grouping, data.counts,
                                               ctx.specs.grouping.max_imbalance)
    if note:
      print(f"[grouping] {note}", flush=True)
  grouping.save(path)
  return grouping


def stage_group_experts(ctx: context_lib.RunContext, grouping: grouping_lib.Grouping,
                        stage1: bool = True) -> dict:
  """The hierarchical plugin's expert sets (`hierarchical.expert_requests`), trained or opened
  under `<expert root>/grouping_<fingerprint>/`: request name -> (set, classifier set or None)."""
  root = hierarchical.experts_root(ctx.expert_root, grouping)
  out = {}
  for request in hierarchical.expert_requests(ctx.specs.hierarchical, grouping, ctx.data.counts,
                                              stage1):
    expert_set = train_expert_set(ctx, root / request.folder, request.labelling, request.balance)
    out[request.name] = (expert_set,
                         train_classifier_set(ctx, expert_set) if request.decoupled else None)
  return out


# ----------------------------------------------------------------------------------------------
# Distillation.


def flat_objective(ctx: context_lib.RunContext, expert_set: experts.ExpertSet,
                   classifier_set: experts.ExpertSet | None) -> distill.MatchingObjective:
  """The objective of flat distillation: the flat experts (and their classifier experts under
  LTDD's ED)."""
  if ctx.method.options.ed and classifier_set is None:
    raise errors.InputError("LTDD's expert decoupling (ltdd.ed) needs the classifier experts; "
                            "none were given (train them with experts.classifier_epochs >= 1).")
  data = ctx.data
  source = distill.ExpertSource(expert_set, classifier_set, np.arange(data.num_classes),
                                data.counts, ctx.specs.experts.sampling)
  return distill.make_objective(source, ctx.specs.matching, ctx.mesh)


def hierarchical_objectives(ctx: context_lib.RunContext,
                            grouping: grouping_lib.Grouping) -> list[distill.MatchingObjective]:
  """The plugin's stage-1 and stage-2 objectives for a grouping (training their experts first)."""
  specs = ctx.specs
  sets = stage_group_experts(ctx, grouping, hierarchical.stage1_used(specs.hierarchical, grouping))
  planned = hierarchical.sources(specs.hierarchical, grouping, ctx.data.counts, sets,
                                 specs.distill.inner.syn_steps)
  return [distill.make_objective(source, specs.matching, ctx.mesh, weight, syn_steps)
          for source, weight, syn_steps in planned]


def stage_distill(ctx: context_lib.RunContext) -> synthetic.DistilledSet:
  """The run's synthetic set: trajectory matching (`distil_by_matching`) or statistics matching
  (`synthesize.stage_synthesize`), its labels rectified under `+rectify`; writes synthetic.npz and
  the PNG grid, and returns the set."""
  if ctx.method.base.kind == registry.STATISTICS:
    syn = synthesize.stage_synthesize(ctx, grouped_synthesis(ctx) if ctx.method.hierarchical
                                      else None)
  else:
    syn = distil_by_matching(ctx)
  if rectifies_final(ctx):
    syn = rectify_set(ctx, syn, ctx.method.two_stage)
  ipc = ctx.specs.init.ipc
  syn.save(ctx.workdir, ctx.data.preprocessor, f"{ctx.config.method} synthetic set, IPC {ipc}",
           per_class=min(ipc, 10))
  return syn


def grouped_synthesis(ctx: context_lib.RunContext):
  """The `+hierarchical` objective of a statistics-matching run, from its grouping."""
  return specs_lib.grouped_synthesis(ctx.config, stage_grouping(ctx))


def distil_by_matching(ctx: context_lib.RunContext) -> synthetic.DistilledSet:
  """Experts (if missing), then distillation (flat, or hierarchical for `+hierarchical`)."""
  config, workdir, specs = ctx.config, ctx.workdir, ctx.specs
  expert_set, classifier_set = stage_experts(ctx)
  start = time.time()
  init, label_record = synthetic.initial_synthetic(specs.init, ctx.data, expert_set,
                                                   classifier_set)
  log_label_init(ctx.metrics, label_record)
  if ctx.method.options.rectify_init:
    init = rectify_initial(ctx, init)
  if ctx.method.hierarchical:
    objectives = hierarchical_objectives(ctx, stage_grouping(ctx))
  else:
    objectives = [flat_objective(ctx, expert_set, classifier_set)]
  names = [o.name for o in objectives]
  ctx.metrics.write_once(
      "objectives", 0, names=names, weights=[o.weight for o in objectives],
      syn_steps=[o.syn_steps for o in objectives],
      expert_decoupling=[o.classifier_experts is not None for o in objectives])
  resume.claim(config, workdir / "distill_ckpt", "distill")

  def validate(state):  # Evaluated as the final set will be, on the validation split.
    syn = synthetic.DistilledSet.from_state(state, names)
    if rectifies_final(ctx) and specs.rectify.mode != "validation":  # (too dear to validate)
      syn = rectify_set(ctx, syn, ctx.method.two_stage, log=False)
    return evaluate_synthetic(ctx, syn, ctx.method.two_stage, "validation")

  state = distill.run_distillation(specs.distill, objectives, init, workdir / "distill_ckpt",
                                   ctx.mesh, metrics=ctx.metrics, validate=validate)
  ctx.metrics.write_once("distill_done", specs.distill.iterations, seconds=time.time() - start)
  return synthetic.DistilledSet.from_state(state, names, label_record)


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


# ----------------------------------------------------------------------------------------------
# Soft-label rectification (`+rectify`).


def rectifies_final(ctx: context_lib.RunContext) -> bool:
  """The run rectifies its finished set's labels (`+rectify` with `rectify.at` final or both)."""
  return ctx.method.rectifies and ctx.specs.rectify.at in ("final", "both")


def rectify_initial(ctx: context_lib.RunContext, init: dict) -> dict:
  """The initial state with its label logits rectified (`rectify.at` init or both; tau by `adsa`
  on the initial images, or `fixed`), before distillation learns them."""
  logits, record = rectify_lib.rectify_logits(init["label_logits"], init["labels"],
                                              ctx.data.counts, ctx.specs.rectify)
  ctx.metrics.write_once("rectify_init", 0, **record.record())
  return {**init, "label_logits": logits.astype(np.float32)}


def rectify_set(ctx: context_lib.RunContext, syn: synthetic.DistilledSet, two_stage: bool,
                log: bool = True) -> synthetic.DistilledSet:
  """The set with its soft labels rectified as `config.rectify` says (its learned ones kept).

  `adsa` and `fixed` cost no training. `validation` evaluates the set rectified with each of
  `rectify.validation_taus` on the validation split (as it will be evaluated: flat, or two-stage)
  and keeps the best; each candidate's score is kept in `<workdir>/rectify_validation.json`, so
  an interrupted choice resumes. A set that already carries the same rectification (`rectify_key`)
  is returned as it is, so the pipeline's evaluation does not redo its distillation's. A `rectify`
  line goes to metrics.jsonl whenever the set's rectification changes.
  """
  spec = ctx.specs.rectify
  if syn.label_logits is None:
    raise errors.InputError(f"{ctx.config.method}: +rectify acts on soft labels and this set has "
                            "none (hard labels only); evaluate it without +rectify.")
  key = rectify_key(ctx, syn, two_stage)
  if syn.rectify_record.get("key") == key:
    return syn
  tau = scores = None
  if spec.mode == "validation":
    scores = validation_scores(ctx, syn, two_stage, key)
    tau = rectify_lib.choose_validated(scores)
  probs, rectification = rectify_lib.rectify(syn.label_logits, syn.labels, ctx.data.counts, spec,
                                             tau, scores, probs=syn.soft_labels)
  record = {**rectification.record(), "key": key}
  if log:
    ctx.metrics.write("rectify", 0, **record)
  return syn.with_rectified(probs, record)


def rectify_key(ctx: context_lib.RunContext, syn: synthetic.DistilledSet,
                two_stage: bool) -> str:
  """What a rectification depends on: the set's labels and label logits, the class counts and
  `config.rectify`; for `validation` also the images and lr, flat or two-stage (and the
  grouping and two-stage architecture), the evaluation settings and the seed."""
  config = ctx.config
  arrays = [syn.labels, syn.label_logits, ctx.data.counts]
  settings = [config.rectify.to_dict()]
  if ctx.specs.rectify.mode == "validation":
    arrays += [syn.images, syn.lr]
    settings += [two_stage, config.evaluate.to_dict(), config.seed,
                 config.grouping.to_dict() if two_stage else None]
    if two_stage:
      settings.append(config.two_stage.arch)
  digest = hashlib.sha256()
  for array in arrays:
    digest.update(np.ascontiguousarray(array).tobytes())
  digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
  return digest.hexdigest()[:16]


def validation_scores(ctx: context_lib.RunContext, syn: synthetic.DistilledSet, two_stage: bool,
                      key: str) -> dict:
  """{tau: validation accuracy} of the set rectified with each `rectify.validation_taus`
  (resumed from `<workdir>/rectify_validation.json` when it holds scores for the same `key`)."""
  spec = ctx.specs.rectify
  path = ctx.workdir / "rectify_validation.json"
  saved = json.loads(path.read_text()) if path.exists() else {}
  scores = ({float(t): v for t, v in saved.get("scores", {}).items()}
            if saved.get("key") == key else {})
  fixed = dataclasses.replace(spec, mode="fixed")
  for tau in spec.validation_taus:
    if float(tau) in scores:
      continue
    probs, rectification = rectify_lib.rectify(syn.label_logits, syn.labels, ctx.data.counts,
                                               fixed, tau, probs=syn.soft_labels)
    candidate = syn.with_rectified(probs, rectification.record())
    report = evaluate_synthetic(ctx, candidate, two_stage, "validation")
    scores[float(tau)] = report["val_acc_mean"]
    ctx.metrics.write("rectify_validation", 0, tau=float(tau), val_acc_mean=scores[float(tau)])
    reporting.write_json(path, {"key": key, "scores": {str(t): v for t, v in scores.items()}})
  return {float(t): scores[float(t)] for t in spec.validation_taus}


# ----------------------------------------------------------------------------------------------
# Evaluation.


def baseline_set(ctx: context_lib.RunContext, base: str) -> protocol_lib.LabelledSet:
  """A baseline's labelled set: the full LT set, or a random or herding selection."""
  config, data = ctx.config, ctx.data
  ev = config.evaluate
  if base == "full":
    return protocol_lib.LabelledSet(data.train_images, data.train_labels, data.train_labels,
                                    ev.full_lr, ev.full_epochs, None, base, real=True)
  ipc = config.distill.ipc
  if base == "random":
    idx = selection.random_selection(data.train_labels, data.num_classes, ipc, config.seed,
                                     config.distill.allow_duplicates)
  elif base == "herding":
    expert_set, _ = stage_experts(ctx)
    feats = expert_set.features(data.train_images)
    idx = selection.herding_selection(feats, data.train_labels, data.num_classes, ipc,
                                      config.distill.allow_duplicates)
  else:
    raise errors.InputError(f"Unknown baseline {base!r}; accepted: {registry.BASELINES}.")
  labels = data.train_labels[idx]
  return protocol_lib.LabelledSet(data.train_images[idx], labels, labels, ev.lr, ev.epochs, ipc,
                                  base, real=True)


def synthetic_set(ctx: context_lib.RunContext,
                  syn: synthetic.DistilledSet) -> protocol_lib.LabelledSet:
  """A distilled set as evaluation consumes it (`DistilledSet.labelled`) under `config.evaluate`."""
  ev = ctx.config.evaluate
  return syn.labelled(ctx.config.method, ev.epochs, ctx.data.num_classes,
                      None if ev.use_learned_lr else ev.lr)


def evaluate_synthetic(ctx: context_lib.RunContext, syn: synthetic.DistilledSet, two_stage: bool,
                       split: str, checkpoint_dir=None) -> dict:
  """Evaluates a distilled set. A rectified set's networks fit its rectified labels; the two-stage
  classifier instead rectifies its group and within-group targets in their own label spaces
  (`TwoStageSpec.rectify`), from the learned labels, with the set's tau unless `adsa` chooses per
  stage (its flat comparison network fits the rectified class labels)."""
  record = syn.rectify_record
  if not (two_stage and record):
    return evaluate_labelled(ctx, synthetic_set(ctx, syn), two_stage, split, checkpoint_dir)
  tau = None if record["mode"] == "adsa" else record["tau"]
  return evaluate_labelled(ctx, synthetic_set(ctx, syn.with_rectified(None, {})), two_stage,
                           split, checkpoint_dir, rectify_stages=(ctx.specs.rectify, tau),
                           flat_set=synthetic_set(ctx, syn))


# What report.json's `classifiers` keeps of each classifier's evaluation.
COMPARED_FIELDS = ("test_acc_mean", "test_acc_std", "per_class_acc", "many_acc", "medium_acc",
                   "few_acc", "per_class_acc_std", "head_tail_gap", "pred_kl_uniform", "group_acc",
                   "within_group_acc", "lr", "wall_seconds")
CLASSIFIERS = ("flat", *two_stage_lib.ARCHS)


def evaluate_labelled(ctx: context_lib.RunContext, train_set: protocol_lib.LabelledSet,
                      two_stage: bool, split: str, checkpoint_dir=None,
                      rectify_stages: tuple | None = None,
                      flat_set: protocol_lib.LabelledSet | None = None) -> dict:
  """Evaluates a labelled set with one network per run (flat) or the two-stage classifier
  (`rectify_stages`: (RectifySpec, tau or None) rectifying its stages' soft targets).

  A two-stage test evaluation with `two_stage.compare` also evaluates the other classifiers on
  the same set, each under `<checkpoint_dir>/<classifier>`: one flat network (on `flat_set`,
  default `train_set`: the class labels or soft labels, the flat lr) and the other two-stage
  architecture; `classifiers` in the report holds every one's figures (`COMPARED_FIELDS`)."""
  held_out = protocol_lib.HeldOut.of(ctx.data, split)
  protocol = ctx.specs.protocol
  if not two_stage:
    return protocol_lib.evaluate_set(protocol, train_set, held_out, ctx.mesh, checkpoint_dir,
                                     teacher=relabel_teacher(ctx))
  spec = specs_lib.two_stage_spec(ctx.config, stage_grouping(ctx))
  if rectify_stages is not None:
    spec = dataclasses.replace(spec, rectify=rectify_stages[0], tau=rectify_stages[1],
                               class_counts=tuple(int(n) for n in ctx.data.counts))
  train_set = dataclasses.replace(train_set, method=ctx.config.method)
  report = two_stage_lib.evaluate_two_stage(protocol, spec, train_set, held_out, ctx.mesh,
                                            checkpoint_dir)
  if split != "test" or not ctx.config.two_stage.compare:
    return report
  reports = {spec.arch: report}
  for name in CLASSIFIERS:
    if name in reports:
      continue
    folder = protocol_lib.subfolder(checkpoint_dir, name)
    if name == "flat":
      flat = dataclasses.replace(flat_set or train_set, method=ctx.config.method)
      reports[name] = protocol_lib.evaluate_set(protocol, flat, held_out, ctx.mesh, folder)
    else:
      reports[name] = two_stage_lib.evaluate_two_stage(
          protocol, dataclasses.replace(spec, arch=name), train_set, held_out, ctx.mesh, folder)
  report["classifiers"] = {name: {k: reports[name][k] for k in COMPARED_FIELDS
                                  if k in reports[name]} for name in CLASSIFIERS}
  return report


def relabel_teacher(ctx: context_lib.RunContext) -> protocol_lib.Teacher | None:
  """The teacher of `evaluate.protocol=relabel` (None under `fixed`): the statistics-matching
  teacher trained on the run's LT set (`synthesize.stage_observers`, shared by every run of the
  same data and observer settings), normalising with its recalibrated balanced statistics."""
  if ctx.config.evaluate.protocol != "relabel":
    return None
  classifier, params = synthesize.stage_observers(ctx)
  own, _, stored, batch_stats = synthesize.calibrated(ctx, classifier, params, 1)
  return protocol_lib.Teacher(stored, {"params": own, "batch_stats": batch_stats},
                              specs_lib.teacher_temperature(ctx.config))


def report_name(method: registry.Method, which: str, split: str) -> str:
  """`report` for the run's own set (the synthetic set, or the baseline the method names), else
  `report_<set>`, so evaluating random, herding and full in one workdir keeps every report;
  `validation_` in front for the validation split."""
  own = which.startswith("synthetic") or which == method.base.name
  name = "report" if own else f"report_{which}"
  return name if split == "test" else f"validation_{name}"


def stage_evaluate(ctx: context_lib.RunContext, which: str = "synthetic", two_stage: bool = False,
                   split: str = "test", *, syn: synthetic.DistilledSet | None = None,
                   clock: reporting.WallClock | None = None, **extra) -> dict:
  """Evaluates a set and writes report.json + report_per_class.png (validation_report.* when
  `split` is `validation`).

  Args:
    ctx: the run.
    which: `synthetic` (<workdir>/synthetic.npz), `synthetic:PATH`, `random`, `herding` or `full`.
    two_stage: evaluate with the two-stage classifier (grouping from the config).
    split: `test` (reported numbers) or `validation` (model selection and tuning).
    syn: the distilled set in memory (the run's own, just distilled): not read back from its file.
    clock: the run's clock: `wall_seconds` is then every segment of the run (a resumed one's
      too) and `segment_seconds` the last; default: this evaluation's own time.
    extra: more report fields.
  """
  data = ctx.data
  start = time.time()
  name = report_name(ctx.method, which, split)
  saved_state = ctx.workdir / "evaluate_ckpt" / name  # Resumes an interrupted evaluation.
  if which.startswith("synthetic"):
    if syn is None:
      _, _, path = which.partition(":")
      syn = synthetic.DistilledSet.load(path or ctx.workdir / "synthetic.npz", data.num_classes,
                                        data.image_shape)
    # The method says whether its labels are rectified: a set saved rectified is evaluated
    # unrectified without +rectify, and one saved without is rectified now with it.
    syn = rectify_set(ctx, syn, two_stage) if rectifies_final(ctx) else syn.with_rectified(None, {})
    train_set = synthetic_set(ctx, syn)
    report = evaluate_synthetic(ctx, syn, two_stage, split, saved_state)
    if syn.rectify_record:  # Two-stage networks train on `rectify_stages` instead.
      report["rectify"] = {**syn.rectify_record,
                           "applied_to": "class targets" if not two_stage else "stages"}
  elif which in registry.BASELINES:
    train_set = baseline_set(ctx, which)
    report = evaluate_labelled(ctx, train_set, two_stage, split, saved_state)
  else:
    raise errors.InputError(f"--set={which!r}: accepted synthetic, synthetic:PATH, "
                            f"{', '.join(registry.BASELINES)}.")
  report["evaluation_protocol"] = ctx.config.evaluate.protocol
  if ctx.config.evaluate.protocol == "relabel":
    report["relabel_recipe"] = ctx.config.evaluate.relabel_recipe
  report["wall_seconds"] = time.time() - start if clock is None else clock.total
  report["segment_seconds"] = time.time() - start if clock is None else clock.segment
  report.update(extra)
  if train_set.ipc is not None:  # Classes whose real images had to be repeated to reach the IPC.
    report["repeated_classes"] = checks.short_classes(data.counts, train_set.ipc)
  report["class_names"] = list(data.class_names)
  report_lib.write_report(ctx.workdir, report, data.counts, name, data.class_names)
  if jax.process_index() == 0:  # One process removes what every process saved into.
    shutil.rmtree(saved_state, ignore_errors=True)
    with contextlib.suppress(OSError):  # evaluate_ckpt/ itself, once no evaluation is under way
      saved_state.parent.rmdir()
  prefix = metrics_lib.SPLIT_PREFIX[split]
  ctx.metrics.write("evaluate", 0, method=train_set.method, split=split,
                    **{f"{prefix}_acc_{k}": report[f"{prefix}_acc_{k}"] for k in ("mean", "std")})
  return report


def run_pipeline(config, workdir, data=None) -> dict:
  """The main job: experts -> distillation -> evaluation -> report (or a baseline's evaluation).

  `data`: the loaded dataset of `config.data` when the caller already has it (see `setup`)."""
  started = time.time()
  ctx = setup(config, workdir, data)
  # The run's time over every segment (each rerun that resumes it adds one).
  clock = reporting.WallClock(ctx.workdir, started=started).start()
  method = ctx.method
  try:  # Every plugin is evaluated with the two-stage classifier.
    if method.synthesizes:
      return stage_evaluate(ctx, "synthetic", method.two_stage, syn=stage_distill(ctx),
                            clock=clock, stage="pipeline")
    return stage_evaluate(ctx, method.base.name, method.two_stage, clock=clock, stage="pipeline")
  finally:
    clock.stop()
