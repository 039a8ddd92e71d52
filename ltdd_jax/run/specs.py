"""Config -> the frozen specs every layer below the stages takes; the only reader of the config
besides the stages, checks and resume records.

`Specs.from_config` builds them once per run (in `pipeline.setup`); a stage passes each function
the spec it needs, never the ConfigDict.
"""

from __future__ import annotations

import dataclasses

from ltdd_jax import models, seeds
from ltdd_jax.core import augment, ensemble, matching, training
from ltdd_jax.data import dataset
from ltdd_jax.evaluation import protocol as protocol_lib
from ltdd_jax.methods import distill, experts, grouping, hierarchical, rectify, registry
from ltdd_jax.methods import observer, synthetic, two_stage, unilevel


def _tuples(value):
  """Lists (what a command-line override or JSON gives) as tuples, so specs stay hashable."""
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  return value


def from_section(cls, section, **overrides):
  """A spec dataclass from the config section whose keys are its fields (extra keys ignored)."""
  names = {f.name for f in dataclasses.fields(cls)}
  values = {k: _tuples(v) for k, v in section.items() if k in names}
  return cls(**{**values, **overrides})


def method(config) -> registry.Method:
  """The run's parsed `config.method` (with `config.ltdd`'s switches)."""
  return registry.parse(config.method, dam=config.ltdd.dam, ed=config.ltdd.ed,
                        ltdd_grow_window=config.ltdd.grow_window, rectify_at=config.rectify.at)


def rectify_spec(config) -> rectify.RectifySpec:
  """`config.rectify`."""
  return from_section(rectify.RectifySpec, config.rectify)


def dsa(config, enabled: bool) -> augment.DSASpec | None:
  """`config.dsa` when a stage augments (its own switch), else None."""
  return from_section(augment.DSASpec, config.dsa) if enabled else None


def model(config) -> models.ModelSpec:
  """`config.model`."""
  return from_section(models.ModelSpec, config.model)


def data(config) -> dataset.DataSpec:
  """`config.data`."""
  return from_section(dataset.DataSpec, config.data)


def expert_spec(config) -> experts.ExpertSpec:
  """How the run's experts train: `config.experts` with the model, DSA and seed."""
  return from_section(experts.ExpertSpec, config.experts, model=model(config),
                      augment=dsa(config, config.experts.dsa), seed=config.seed)


def protocol(config) -> protocol_lib.Protocol:
  """`config.evaluate` with the model, DSA, seed and shot rule."""
  ev = config.evaluate
  return protocol_lib.Protocol(
      model=model(config), augment=dsa(config, ev.dsa), seed=config.seed,
      num_models=ev.num_models, batch_size=ev.batch_size, momentum=ev.momentum,
      weight_decay=ev.weight_decay, archs=_tuples(ev.archs), cross_arch_width=ev.cross_arch_width,
      test_batch_size=ev.test_batch_size, shot_rule=config.data.shot_rule,
      checkpoint_seconds=ev.checkpoint_seconds, relabel_student=relabel_student(config))


STUDENT_AUGMENTS = ("flip", "dsa", "none")


def relabel_student(config) -> protocol_lib.StudentRecipe | None:
  """`config.evaluate.rded` under `evaluate.relabel_recipe=rded`, else None (the protocol's own
  recipe). Its augmentation: a per-image horizontal flip, the run's DSA, or none."""
  ev = config.evaluate
  if ev.relabel_recipe != "rded":
    return None
  aug = {"flip": augment.DSASpec(strategy="flip", siamese=False), "none": None,
         "dsa": dsa(config, True)}[ev.rded.augment]
  return from_section(protocol_lib.StudentRecipe, ev.rded, augment=aug)


def teacher_temperature(config) -> float:
  """The relabelling teacher's softmax temperature: the student recipe's under `rded` (its loss
  divides both networks' logits by it), else `evaluate.relabel_temperature`."""
  ev = config.evaluate
  return ev.rded.temperature if ev.relabel_recipe == "rded" else ev.relabel_temperature


def inner(config) -> matching.InnerSpec:
  """The student's inner training."""
  d = config.distill
  return matching.InnerSpec(syn_steps=d.syn_steps, batch_syn=d.batch_syn, remat=d.remat,
                            remat_policy=d.remat_policy, weight_reduction=config.ltdd.dam_reduction,
                            augment=dsa(config, d.dsa))


def distill_spec(config, run_method: registry.Method) -> distill.DistillSpec:
  """The outer optimisation: `config.distill`, DATM's window and label optimiser when the method
  learns soft labels or grows its window."""
  d, datm = config.distill, config.datm
  window = distill.StartWindow(d.max_start_epoch, run_method.options.grow_window,
                               datm.min_start_epoch, datm.initial_max_start_epoch,
                               datm.window_grow_every)
  return distill.DistillSpec(
      iterations=d.iterations, expert_epochs=d.expert_epochs, window=window, inner=inner(config),
      lr_img=d.lr_img, lr_lr=d.lr_lr, syn_lr_init=d.syn_lr_init, momentum=d.momentum,
      label_lr=datm.lr_label if run_method.options.soft_labels else None,
      label_momentum=datm.label_momentum, lr_per_objective=d.lr_per_objective, seed=config.seed,
      checkpoint_every=d.checkpoint_every, log_every=d.log_every, eval_every=d.eval_every)


def matching_options(config, run_method: registry.Method) -> distill.MatchingOptions:
  """What every objective shares: the inner spec, DAM, ED's terms (`config.ltdd`)."""
  ltdd = config.ltdd
  ed = distill.EDSpec(backbone_weight=ltdd.backbone_weight,
                      classifier_weight=ltdd.classifier_weight,
                      max_start_epoch=ltdd.classifier_max_start_epoch, dam=ltdd.classifier_dam,
                      freeze_backbone=ltdd.classifier_freeze_backbone)
  return distill.MatchingOptions(inner(config), dam=run_method.options.dam, ed=ed)


def init_spec(config, run_method: registry.Method) -> synthetic.InitSpec:
  """How the synthetic set starts; soft labels as `config.datm` (datm) or `config.ltdd` (ltdd)
  select their images (their published selections differ)."""
  d = config.distill
  labels = None
  if run_method.options.soft_labels:
    selection = config.ltdd if run_method.base.ltdd else config.datm
    labels = synthetic.LabelInitSpec(correct_only=config.datm.correct_only,
                                     search_experts=selection.init_experts,
                                     duplicate=selection.duplicate,
                                     label_epoch=config.datm.label_expert_epoch)
  return synthetic.InitSpec(ipc=d.ipc, init=d.init, syn_lr=d.syn_lr_init,
                            allow_duplicates=d.allow_duplicates, seed=config.seed, labels=labels,
                            batch_size=config.evaluate.test_batch_size)


def grouping_spec(config) -> grouping.GroupingSpec:
  """`config.grouping`'s partition keys."""
  return from_section(grouping.GroupingSpec, config.grouping)


def stage1(config):
  """How stage-1 networks trained on real images counter the between-group imbalance."""
  return hierarchical.stage1_balance(config.grouping.stage1_sampling, config.grouping.stage1_loss)


def hierarchical_spec(config, run_method: registry.Method) -> hierarchical.HierarchicalSpec:
  """The hierarchical plugin's settings (`config.grouping`) and what it needs of the run."""
  g = config.grouping
  return hierarchical.HierarchicalSpec(
      lambda_1=g.lambda_1, lambda_2=g.lambda_2, stage1=stage1(config), experts=expert_spec(config),
      ipc=config.distill.ipc, step_matched_unroll=g.step_matched_unroll,
      ed=run_method.options.ed, ed_min_imbalance=g.ed_min_imbalance)


def two_stage_spec(config, groups: grouping.Grouping) -> two_stage.TwoStageSpec:
  """The two-stage classifier of `groups` (`grouping.prediction`, the stage-1 balance,
  `two_stage.arch`)."""
  return two_stage.TwoStageSpec(groups, config.grouping.prediction, stage1(config),
                                arch=config.two_stage.arch)


@dataclasses.dataclass(frozen=True)
class Specs:
  """Every spec of one run, built once from its config."""
  method: registry.Method
  data: dataset.DataSpec
  model: models.ModelSpec
  experts: experts.ExpertSpec
  protocol: protocol_lib.Protocol
  distill: distill.DistillSpec
  matching: distill.MatchingOptions
  init: synthetic.InitSpec
  grouping: grouping.GroupingSpec
  hierarchical: hierarchical.HierarchicalSpec
  rectify: rectify.RectifySpec

  @classmethod
  def from_config(cls, config) -> "Specs":
    run_method = method(config)
    return cls(method=run_method, data=data(config), model=model(config),
               experts=expert_spec(config), protocol=protocol(config),
               distill=distill_spec(config, run_method),
               matching=matching_options(config, run_method),
               init=init_spec(config, run_method), grouping=grouping_spec(config),
               hierarchical=hierarchical_spec(config, run_method),
               rectify=rectify_spec(config))


def observer_recipe(config, data) -> tuple[ensemble.Recipe, models.ModelSpec]:
  """The statistics-matching observer and teacher (`config.unilevel.observer_*`): two batch-norm
  ConvNets of the run's depth and width trained in one program with the robust and debias terms
  (`observer.ObserverKernel`), network 0 the observer, network 1 the teacher."""
  u = config.unilevel
  spec = dataclasses.replace(model(config), norm="batch")
  net = observer.ObserverNet(models.make_backbone(spec), data.num_classes,
                             u.observer_projection_dim, spec.init)
  n = len(data.train_labels)
  train = training.TrainSpec(
      batch_size=min(u.observer_batch_size, n),
      steps_per_epoch=training.steps_per_epoch(n, min(u.observer_batch_size, n)),
      momentum=u.observer_momentum, weight_decay=u.observer_weight_decay,
      num_classes=data.num_classes, augment=dsa(config, u.observer_dsa))
  kernel = observer.ObserverKernel(epochs=u.observer_epochs, q=u.observer_q,
                                   normalise=u.observer_normalise,
                                   robust_weight=u.observer_robust_weight,
                                   debias_weight=u.observer_debias_weight)
  cosine = u.observer_schedule == "warmup_cosine"  # after `observer_warmup` of the epochs
  recipe = ensemble.Recipe(
      net, train, u.observer_lr, u.observer_epochs, 2,
      init_seed=seeds.offset(config.seed, seeds.OBSERVERS),
      keys=seeds.EpochKeys(seeds.offset(config.seed, seeds.OBSERVERS), first_fold=1),
      ensemble_impl=spec.ensemble_impl, kernel=kernel,
      warmup_epochs=int(round(u.observer_warmup * u.observer_epochs)) if cosine else 0,
      cosine=cosine)
  return recipe, spec


def synthesis_spec(config) -> unilevel.SynthesisSpec:
  """How the statistics-matching images are recovered (`config.unilevel`'s synthesis keys)."""
  u = config.unilevel
  return unilevel.SynthesisSpec(
      ipc=config.distill.ipc, iterations=u.iterations, lr=u.lr, beta1=u.beta1, beta2=u.beta2,
      ce_weight=u.ce_weight, statistics_weight=u.statistics_weight, class_weight=u.class_weight,
      first_multiplier=u.first_multiplier, crops=u.crops, min_scale=u.min_scale, seed=config.seed)


def grouped_synthesis(config, groups: grouping.Grouping) -> unilevel.GroupedSynthesis:
  """The `+hierarchical` objective of statistics matching: the grouping and the stage weights
  (`config.grouping.lambda_1`, `lambda_2`)."""
  return unilevel.GroupedSynthesis(tuple(int(g) for g in groups.group_of),
                                   config.grouping.lambda_1, config.grouping.lambda_2)
