"""The run context: what every stage of one run shares, built once by `pipeline.setup`.

A stage (`pipeline.stage_*`) takes a `RunContext` and reads its hyperparameters from
`context.config`; so do the steps a stage chains (`experts.train_experts`,
`synthetic.initial_synthetic`, `distill.run_distillation`, `hierarchical.hierarchical_objectives`).
Below them, functions take the few values they need or a frozen spec (`evaluate.Protocol`,
`experts.Recipe`, `matching.InnerSpec`, ...).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from ltdd_jax import reporting


@dataclasses.dataclass(frozen=True, eq=False)
class RunContext:
  """One run's config, workdir, loaded data and device mesh.

  Attributes:
    config: the resolved, checked ConfigDict.
    workdir: the run's folder (config.json, metrics.jsonl, checkpoints, reports).
    data: the loaded `dataset.Dataset` of `config.data`.
    mesh: the device mesh (`parallel.make_mesh`).
  """
  config: Any
  workdir: pathlib.Path
  data: Any
  mesh: Any

  @property
  def metrics(self) -> reporting.MetricsWriter:
    """The run's metrics.jsonl writer."""
    return reporting.MetricsWriter(self.workdir)

  @property
  def expert_root(self) -> pathlib.Path:
    """Where the run's expert sets live (`expert_root`)."""
    return expert_root(self.config, self.workdir)


def expert_root(config, workdir) -> pathlib.Path:
  """Where expert sets live: `experts.directory` when set (shared across runs), else
  <workdir>/experts. Experts depend on the data, model, expert and seed settings only, so runs
  that differ in method or IPC can share them."""
  return pathlib.Path(config.experts.directory or pathlib.Path(workdir) / "experts")
