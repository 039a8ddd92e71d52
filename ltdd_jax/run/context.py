"""The run context: what every stage of one run shares, built once by `pipeline.setup`.

A stage (`pipeline.stage_*`) takes a `RunContext`: the config (which only the stages, the checks
and the resume records read), the specs built from it, the parsed method, the workdir, the loaded
data and the device mesh. Below the stages, functions take the few values or the frozen spec they
need.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from ltdd_jax import reporting
from ltdd_jax.run import specs as specs_lib


@dataclasses.dataclass(frozen=True, eq=False)
class RunContext:
  """One run's config, specs, workdir, loaded data and device mesh.

  Attributes:
    config: the resolved, checked ConfigDict.
    specs: every spec built from it (`specs.Specs`), the parsed method among them.
    workdir: the run's folder (config.json, metrics.jsonl, checkpoints, reports).
    data: the loaded `dataset.Dataset` of `config.data`.
    mesh: the device mesh (`parallel.make_mesh`).
  """
  config: Any
  specs: specs_lib.Specs
  workdir: pathlib.Path
  data: Any
  mesh: Any

  @property
  def method(self):
    """The parsed `config.method` (`registry.Method`)."""
    return self.specs.method

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
