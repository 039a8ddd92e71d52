"""Every method and plugin by name: `config.method` (e.g. 'ltdd+hierarchical') parsed once.

A base method makes the set: a trajectory-matching method (`mtt`, `datm`, `ltdd`: DESIGN §4), a
statistics-matching one (`unilevel`: images recovered from a batch-norm observer's per-class
statistics, labelled by a teacher), a selection of real images (`random`, `herding`) or the whole
long-tailed set (`full`). Plugins
change how a set is made or evaluated: `+two_stage` evaluates it with the two-stage classifier,
`+hierarchical` makes the set in two stages, group and within-group (trajectory matching: against
group and per-group experts; statistics matching: group and within-group terms of its objective),
and is evaluated two-stage,
`+rectify` removes the head bias of a set's soft labels (`methods.rectify`; soft-label bases only).
Adding a method is one entry in BASES (and its code); adding a plugin, one in PLUGINS.
"""

from __future__ import annotations

import dataclasses

from ltdd_jax import errors

MATCHING, STATISTICS, SELECTION, WHOLE_SET = "matching", "statistics", "selection", "whole_set"
SYNTHESIS = (MATCHING, STATISTICS)  # the kinds that make a synthetic set


@dataclasses.dataclass(frozen=True)
class Base:
  """A base method.

  Attributes:
    name: its name in `config.method`.
    kind: `matching` (distils against experts), `statistics` (recovers images from batch-norm
      statistics), `selection` (picks real images) or `whole_set`.
    soft_labels: its set carries soft labels: learned DATM-style from expert logits (matching),
      or a teacher's (statistics).
    grow_window: DATM's growing start-epoch window (`ltdd`: only with `ltdd.grow_window`).
    ltdd: LTDD's options (DAM, ED) apply, as `config.ltdd` sets them.
    needs_experts: reads the flat experts (matching, and herding's features).
    config_sections: the config sections besides `distill` whose values its sets depend on.
  """
  name: str
  kind: str
  soft_labels: bool = False
  grow_window: bool = False
  ltdd: bool = False
  needs_experts: bool = False
  config_sections: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Plugin:
  """A plugin: `distils` (changes the distillation objective, so it needs a base that
  synthesises),
  `two_stage` (the set is evaluated with the two-stage classifier) and `needs_soft_labels` (it
  acts on the soft labels of a base that learns them)."""
  name: str
  distils: bool
  two_stage: bool
  needs_soft_labels: bool = False


BASES = {b.name: b for b in (
    Base("mtt", MATCHING, needs_experts=True),
    Base("datm", MATCHING, soft_labels=True, grow_window=True, needs_experts=True,
         config_sections=("datm",)),
    Base("ltdd", MATCHING, soft_labels=True, ltdd=True, needs_experts=True,
         config_sections=("datm", "ltdd")),
    Base("unilevel", STATISTICS, soft_labels=True, config_sections=("unilevel",)),
    Base("random", SELECTION),
    Base("herding", SELECTION, needs_experts=True),
    Base("full", WHOLE_SET),
)}
PLUGINS = {p.name: p for p in (
    Plugin("two_stage", distils=False, two_stage=True),
    Plugin("hierarchical", distils=True, two_stage=True),
    Plugin("rectify", distils=False, two_stage=False, needs_soft_labels=True),
)}
MATCHING_METHODS = tuple(n for n, b in BASES.items() if b.kind == MATCHING)
BASELINES = tuple(n for n, b in BASES.items() if b.kind not in SYNTHESIS)


@dataclasses.dataclass(frozen=True)
class Options:
  """The option groups a method turns on (their hyperparameters live in the specs).

  Attributes:
    soft_labels: DATM-style learned soft labels.
    grow_window: DATM's growing start-epoch window.
    dam: LTDD's class-frequency-weighted inner loss.
    ed: LTDD's backbone / classifier decoupled matching against classifier experts.
    rectify_init: `+rectify` also rectifies the initial soft labels (`rectify.at` init or both),
      which changes the distillation.
  """
  soft_labels: bool = False
  grow_window: bool = False
  dam: bool = False
  ed: bool = False
  rectify_init: bool = False


@dataclasses.dataclass(frozen=True)
class Method:
  """A parsed `config.method`: its base, its plugins (in the order given) and its options."""
  base: Base
  plugins: tuple[Plugin, ...] = ()
  options: Options = Options()

  @property
  def name(self) -> str:
    return "+".join((self.base.name, *(p.name for p in self.plugins)))

  def has(self, plugin: str) -> bool:
    return any(p.name == plugin for p in self.plugins)

  @property
  def distils(self) -> bool:
    """Makes its set by trajectory matching."""
    return self.base.kind == MATCHING

  @property
  def synthesizes(self) -> bool:
    """Makes a synthetic set (trajectory or statistics matching)."""
    return self.base.kind in SYNTHESIS

  @property
  def hierarchical(self) -> bool:
    return self.has("hierarchical")

  @property
  def rectifies(self) -> bool:
    """Its soft labels are rectified (`+rectify`)."""
    return self.has("rectify")

  @property
  def two_stage(self) -> bool:
    """Evaluated with the two-stage classifier."""
    return any(p.two_stage for p in self.plugins)

  @property
  def distillation(self) -> str:
    """What its distillation is, as resume records it: the base, and the plugins that change the
    objective or its start (`+two_stage` changes only the evaluation, `+rectify` at `final` only
    the finished set's labels)."""
    return "+".join((self.base.name, *(p.name for p in self.plugins
                                       if p.distils or (p.name == "rectify"
                                                        and self.options.rectify_init))))

  @property
  def distills_with(self) -> tuple[str, ...]:
    """The config sections its distillation depends on besides data, model and experts."""
    if self.base.kind == STATISTICS:
      return (("distill", *self.base.config_sections)
              + (("grouping",) if self.hierarchical else ()))
    if not self.distils:
      return ()
    return (("distill", *self.base.config_sections)
            + (("grouping",) if self.hierarchical else ())
            + (("rectify",) if self.options.rectify_init else ()))


def parse(method: str, *, dam: bool = True, ed: bool = True, ltdd_grow_window: bool = False,
          rectify_at: str = "final") -> Method:
  """'ltdd+hierarchical' -> Method, validating every part. `dam`, `ed` and `ltdd_grow_window`
  are `config.ltdd`'s switches (they matter for `ltdd` only), `rectify_at` is `config.rectify.at`
  (it matters for `+rectify` only)."""
  base_name, *plugin_names = method.split("+")
  accepted = ", ".join(BASES)
  if base_name not in BASES:
    raise errors.InputError(f"Unknown method {base_name!r}; accepted: {accepted}, optionally "
                            f"with {', '.join('+' + p for p in PLUGINS)}.")
  plugins = []
  for name in plugin_names:
    if name not in PLUGINS:
      raise errors.InputError(f"Unknown method suffix {name!r} in {method!r}; accepted: "
                              f"{', '.join('+' + p for p in PLUGINS)}.")
    if PLUGINS[name] in plugins:
      raise errors.InputError(f"{method}: +{name} is given twice.")
    plugins.append(PLUGINS[name])
  base = BASES[base_name]
  for plugin in plugins:
    if plugin.distils and base.kind not in SYNTHESIS:
      makers = ", ".join(n for n, b in BASES.items() if b.kind in SYNTHESIS)
      raise errors.InputError(
          f"{method}: +{plugin.name} changes how the set is made, so it needs {makers}; use "
          f"{base_name}+two_stage to evaluate a baseline with the two-stage classifier.")
    if plugin.needs_soft_labels and not base.soft_labels:
      soft = ", ".join(n for n, b in BASES.items() if b.soft_labels)
      raise errors.InputError(
          f"{method}: +{plugin.name} acts on soft labels, and {base_name}'s set has hard labels; "
          f"use it with {soft}.")
  rectifies = any(p.name == "rectify" for p in plugins)
  options = Options(soft_labels=base.soft_labels and base.kind == MATCHING,
                    grow_window=base.grow_window or (base.ltdd and ltdd_grow_window),
                    dam=base.ltdd and dam, ed=base.ltdd and ed,
                    rectify_init=rectifies and rectify_at in ("init", "both"))
  return Method(base, tuple(plugins), options)
