"""A resumable grid of pipeline runs and the tables and figures made from their reports."""

from __future__ import annotations

import csv
import json
import pathlib
import shutil
import time
from typing import Sequence

import numpy as np

from ltdd_jax import errors, reporting
from ltdd_jax.evaluation import protocol as protocol_lib
from ltdd_jax.methods import distill, registry
from ltdd_jax.run import checks, locks, pipeline, published, resume, specs

COLUMNS = ("dataset", "imbalance_factor", "ipc", "method", "images", "test_acc_mean",
           "test_acc_std", "many_acc", "medium_acc", "few_acc", "per_class_acc_std",
           "head_tail_gap", "pred_kl_uniform", "group_acc", "within_group_acc", "learned_lr",
           "teacher_set_acc", "wall_seconds")
FAILED = "failed.txt"  # in a cell whose last attempt diverged: the error, one line
# A cell's own failures: its distillation or its evaluation networks diverged. Experts are shared
# by a factor's cells, so their divergence stops the grid like any other error.
CELL_ERRORS = (distill.DivergenceError, protocol_lib.EvaluationDivergedError)


class CellsDivergedError(errors.DivergedError):
  """Some cells diverged; the others finished and are tabulated."""


# A cell's record (`benchmark.records`): its figures and the settings it ran with, no data.
RECORD_FILES = ("config.json", "report.json")
# Settings a record is not compared on: the grid's own rows and where files are kept. Every other
# value is (a finished cell's figures depend on its iterations and its prediction rule too).
_UNRECORDED = ("benchmark.", "mesh.compilation_cache_dir", "data.cache_dir", "experts.directory")


def cells(config) -> list[tuple[float, int | None, str]]:
  """(imbalance factor, ipc, method) of every cell; `full` once per factor with ipc None."""
  out = []
  for factor in config.benchmark.imbalance_factors:
    if config.benchmark.include_full:
      out.append((float(factor), None, "full"))
    for ipc in config.benchmark.ipcs:
      out.extend((float(factor), int(ipc), m) for m in config.benchmark.methods)
  return out


def cell_name(factor: float, ipc: int | None, method: str) -> str:
  """A cell's folder name, e.g. `if100_ipc10_mtt-two_stage` (`if10_full` for the full set,
  `if10_ipc1_ltdd-rectify@no_dam` for a variant)."""
  return f"if{factor:g}_" + ("" if ipc is None else f"ipc{ipc}_") + method.replace("+", "-")


def split_variant(method: str) -> tuple[str, str | None]:
  """'ltdd+rectify@no_dam' -> ('ltdd+rectify', 'no_dam'); a row without `@` has no variant. A
  table row's classifier suffix (`ltdd+two_stage@no_dam [shared]`) is dropped."""
  name, at, variant = method.split(" [")[0].partition("@")
  return name, (variant if at else None)


def _settings(table, key: str) -> dict:
  """The per-factor or per-IPC settings of a cell; a grid overridden to a value the config gives
  no settings for fails rather than silently running with another value's (unless the config
  sets nothing per value, e.g. digits or the `cpu` profile's IPCs)."""
  if key not in table:
    if not any(len(v) for v in table.values()):
      return {}
    raise errors.InputError(f"The benchmark config has no settings for {key} (it has "
                            f"{sorted(table)}); add benchmark.*_settings.{key} or use listed values.")
  return table[key].to_dict() if hasattr(table[key], "to_dict") else dict(table[key])


# Keys a variant may not set: the row's method is its name, and the grid owns these.
_GRID_KEYS = ("method", "benchmark", "experts.directory")


def _variant_overrides(config, method: str, variant: str) -> dict:
  """`benchmark.variants[variant]` as a nested dict, checked against `_GRID_KEYS`."""
  variants = config.benchmark.get("variants") or {}
  if variant not in variants:
    raise errors.InputError(
        f"benchmark.methods row {method!r} names variant {variant!r}, which benchmark.variants "
        f"does not define (it has {sorted(variants) or 'none'}); define it or drop '@{variant}'.")
  overrides = variants[variant]
  overrides = overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides)
  owned = [k for k in resume.flatten(overrides)
           if any(k == g or k.startswith(f"{g}.") for g in _GRID_KEYS)]
  if owned:
    raise errors.InputError(f"benchmark.variants.{variant} sets {', '.join(owned)}, which the grid "
                            "sets per row; name the method in the row instead.")
  return overrides


def cell_config(config, factor: float, ipc: int | None, method: str, workdir: pathlib.Path):
  """The pipeline config of one cell; experts are shared by every cell of an imbalance factor."""
  c = config.copy_and_resolve_references()
  c.data.imbalance_factor = factor
  c.update(_settings(config.benchmark.factor_settings, f"if{factor:g}"))
  if ipc is not None:
    c.distill.ipc = ipc
    c.update(_settings(config.benchmark.ipc_settings, f"ipc{ipc}"))
  name, variant = split_variant(method)
  c.method = name
  if variant is not None:  # A named set of overrides (`benchmark.variants`), applied last.
    overrides = _variant_overrides(config, method, variant)
    try:
      c.update(overrides)
    except (AttributeError, KeyError) as e:
      raise errors.InputError(f"benchmark.variants.{variant} sets a key the config does not have "
                              f"({e}); fix the key's name.") from e
    except TypeError as e:
      raise errors.InputError(f"benchmark.variants.{variant} gives a value of the wrong type ({e}); "
                              "give the key's own type.") from e
  c.experts.directory = str(workdir / f"if{factor:g}_experts")
  return c


def distilling_cell(workdir: pathlib.Path, factor: float, ipc: int | None, method: str,
                    config=None) -> pathlib.Path | None:
  """The cell whose set a method that only changes the evaluation takes (same factor and IPC):
  X's for `X+two_stage`, `X+rectify` or both (rectifying at `final`); None for others.

  With the grid's `config` (needed for variant rows), the row's own settings decide: `X+rectify@v`
  takes the set of the first of `X`, the grid's `X@w` rows and `X@v` whose distillation settings
  are its own: `X`'s where v changes only the evaluation (e.g. `rectify.mode`), `X@no_dam`'s for
  v = `no_dam_validation`; `X@v` takes `X`'s, or an earlier `X@w` row's, where v changes only the
  evaluation (e.g. `relabel`, `no_dam_relabel` after `no_dam`); a row whose variant makes its
  distillation its own (e.g. `rectify.at=init` for `X+rectify`, `no_dam` for `ltdd`) distils
  itself (None). Only the grid's rows are candidates: a set no cell distils is not taken."""
  name, variant = split_variant(method)
  if config is None:
    if variant is not None:
      raise ValueError(f"distilling_cell needs the grid's config for the variant row {method!r}.")
    parsed = registry.parse(name)
    return (None if parsed.distillation == parsed.name
            else workdir / cell_name(factor, ipc, parsed.distillation))
  own_config = cell_config(config, factor, ipc, method, workdir)
  parsed = specs.method(own_config)
  if parsed.distillation == parsed.name and variant is None:
    return None
  base = parsed.distillation
  own = resume.stage_values(own_config, "distill")
  rows = [m for m in config.benchmark.methods if "@" in m and split_variant(m)[0] == base]
  if name == base and method in rows:  # `X@v` takes an `X@w` row's set only from an earlier row
    rows = rows[:rows.index(method)]
  candidates = [base, *rows] + ([f"{base}@{variant}"] if variant is not None else [])
  candidates = [c for c in dict.fromkeys(candidates) if c in config.benchmark.methods]
  source = next((c for c in candidates if c != method and resume.stage_values(
      cell_config(config, factor, ipc, c, workdir), "distill") == own), None)
  return None if source is None else workdir / cell_name(factor, ipc, source)


def check_cells(config, workdir: pathlib.Path, grid) -> None:
  """Every cell's config checked before any cell runs, so a typo in the last row fails in
  seconds (`InputError` naming the row), not after the first cells' experts; and within each
  imbalance factor, every cell's data, expert and observer settings equal (its cells share one
  dataset, one expert folder and one teacher, so a variant may not change them)."""
  shared = {}
  for factor, ipc, method in grid:
    try:
      c = cell_config(config, factor, ipc, method, workdir)
      checks.check_config(c)
      distilling_cell(workdir, factor, ipc, method, config)
    except errors.InputError as e:
      raise errors.InputError(f"benchmark cell IF {factor:g} IPC {ipc} {method}: {e}") from e
    values = resume.shared_values(c)
    first = shared.setdefault(factor, (method, values))
    if values != first[1]:
      changed = [line.partition(":")[0] for line in resume.differences(first[1], values)]
      raise errors.InputError(
          f"benchmark row {method!r} at IF {factor:g} changes {', '.join(changed)} against row "
          f"{first[0]!r}: a factor's cells share one dataset and one expert set, so a variant may "
          "not change data, model, augmentation or expert settings; run it as its own grid.")


def reuse_distillation(source: pathlib.Path | None, cell: pathlib.Path) -> None:
  """`X+two_stage` (`X+rectify`) evaluates the set X distils (`source`, from `distilling_cell`):
  copy X's finished distillation checkpoints, so the cell's distillation resumes at its last
  iteration instead of running again."""
  resume.copy_distillation(source, cell)


def diverged(source: pathlib.Path | None) -> bool:
  """Whether the distillation of `source` (the cell `X+two_stage` takes its set from) diverged at
  its last attempt: then the two-stage cell is failed without distilling again."""
  return (source is not None and (source / FAILED).exists()
          and distill.DivergenceError.__name__ in (source / FAILED).read_text())


def record_failure(cell: pathlib.Path, error: str, reason: str) -> None:
  """Writes `<cell>/failed.txt` (one line) and says so."""
  cell.mkdir(parents=True, exist_ok=True)
  (cell / FAILED).write_text(f"{error}: {' '.join(reason.split())}\n")
  print(f"[benchmark] cell {cell.name} failed: {reason}", flush=True)


def cell_values(config) -> dict:
  """The values a cell's results depend on, from its config or the `config.json` it ran with."""
  return {k: v for k, v in resume.flatten(config).items() if not k.startswith(_UNRECORDED)}


def restore_records(config, workdir: pathlib.Path, grid) -> int:
  """Copies each cell's record from `benchmark.records` (`<records>/<cell>/`: its report.json and
  config.json) into `<workdir>/<cell>/` where that cell has no report of its own, so a grid
  resumed in a fresh workdir (a new checkout, another machine) runs only the cells no record
  holds. A record made with other settings than the cell's fails naming them, before any cell
  runs. A restored cell keeps no set: a row that evaluates its set again distils it itself.

  Returns:
    How many cells were restored (none without `benchmark.records`).
  """
  if not config.benchmark.records:
    return 0
  records, restored = pathlib.Path(config.benchmark.records), 0
  for factor, ipc, method in grid:
    name = cell_name(factor, ipc, method)
    record, cell = records / name, workdir / name
    if not (record / "report.json").exists() or (cell / "report.json").exists():
      continue
    try:
      recorded = cell_values(json.loads((record / "config.json").read_text()))
    except (OSError, ValueError) as e:
      raise errors.InputError(f"{record} holds a report but no readable config.json ({e}); "
                              "delete that record to measure the cell again.") from e
    current = cell_values(cell_config(config, factor, ipc, method, workdir))
    diff = resume.differences(resume.with_added(recorded, current), current)
    if diff:
      raise errors.ResumeMismatchError(
          f"{record} was measured with other settings than the grid's cell {name}:\n  " +
          "\n  ".join(diff) + "\nSet those values back, delete the record to measure the cell "
          "again, or give another benchmark.records.")
    cell.mkdir(parents=True, exist_ok=True)
    for file in RECORD_FILES:
      shutil.copy2(record / file, cell / file)
    restored += 1
  return restored


def save_records(config, workdir: pathlib.Path, grid) -> None:
  """Copies every finished cell's report.json and config.json into `benchmark.records` (a folder
  meant to be committed), unless a record of that cell is there; the report is written last, so
  a record with a report is whole. Without `benchmark.records`, nothing."""
  if not config.benchmark.records:
    return
  records = pathlib.Path(config.benchmark.records)
  for cell in grid:
    name = cell_name(*cell)
    if not (workdir / name / "report.json").exists() or (records / name / "report.json").exists():
      continue
    (records / name).mkdir(parents=True, exist_ok=True)
    for file in RECORD_FILES:
      shutil.copy2(workdir / name / file, records / name / file)


def run_grid(config, workdir) -> list[dict]:
  """Runs every unfinished cell, then writes results.csv, results.md, summary.md and the figures.

  A cell whose distillation or evaluation diverges (`CELL_ERRORS`: its settings' fault, not the
  grid's) leaves its error in `<cell>/failed.txt` and the grid goes on; once the rest is
  tabulated, one `CellsDivergedError` names every such cell. Any other error stops the grid (it
  resumes on rerun). Each cell's folder is locked while it runs (`locks.each_free`): two grids
  on one folder split the cells, and the table waits for the cells the other one runs. With
  `benchmark.records`, finished cells are restored from and saved to that folder
  (`restore_records`, `save_records`)."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  grid = cells(config)
  check_cells(config, workdir, grid)
  restored = restore_records(config, workdir, grid)
  if restored:
    print(f"[benchmark] {restored} cell(s) restored from {config.benchmark.records}", flush=True)
  reporting.write_json(workdir / "config.json", config.to_dict())
  start = time.time()
  folders = {workdir / cell_name(*cell): (i, cell) for i, cell in enumerate(grid)}

  def done(folder):  # Finished, or failed in this run of the grid (by this or another process).
    failed = folder / FAILED
    return (folder / "report.json").exists() or (failed.exists()
                                                 and failed.stat().st_mtime >= start)

  data_factor, data = None, None  # The current factor's dataset, loaded once for all its cells.
  for cell in locks.each_free(folders, done):
    i, (factor, ipc, method) = folders[cell]
    print(f"[benchmark] cell {i + 1}/{len(grid)}: IF {factor:g} IPC {ipc} {method} "
          f"(elapsed {time.time() - start:.0f}s)", flush=True)
    source = distilling_cell(workdir, factor, ipc, method, config)
    if diverged(source):
      record_failure(cell, distill.DivergenceError.__name__,
                     f"evaluates the set of {source.name}, whose distillation diverged.")
      continue
    reuse_distillation(source, cell)
    cell_cfg = cell_config(config, factor, ipc, method, workdir)
    if factor != data_factor:
      data_factor, data = factor, pipeline.load_dataset(cell_cfg)
    (cell / FAILED).unlink(missing_ok=True)
    try:
      pipeline.run_pipeline(cell_cfg, cell, data=data)
    except CELL_ERRORS as e:  # This cell's settings, not the grid's: record it and go on.
      record_failure(cell, type(e).__name__, str(e))
    save_records(config, workdir, [(factor, ipc, method)])  # Kept even if the grid is stopped.
  save_records(config, workdir, grid)  # Cells another process finished, or finished before.
  rows = collect(workdir, grid)
  failed = failed_cells(workdir, grid)
  write_tables(workdir, rows, len(grid), failed)
  write_figures(workdir, rows, config)
  if failed:
    raise CellsDivergedError(
        f"{len(failed)} cell(s) diverged: {', '.join(failed)} (each one's {FAILED} says how); "
        f"the {sum(not r.get('extra') for r in rows)} finished are tabulated in "
        f"{workdir / 'results.md'}. Change the "
        "diverging cells' settings and rerun with --config.discard_mismatched=distill: only "
        "unfinished cells run again (finished ones keep the settings they ran with).")
  return rows


def failed_cells(workdir: pathlib.Path, grid) -> list[str]:
  """Names of the cells whose last attempt diverged (a `failed.txt`, no report)."""
  names = [cell_name(*cell) for cell in grid]
  return [n for n in names
          if (workdir / n / FAILED).exists() and not (workdir / n / "report.json").exists()]


def collect(workdir: pathlib.Path, grid) -> list[dict]:
  """One row per finished cell, read from its report.json (a two-stage cell that compared
  classifiers: one per classifier, its own architecture's first)."""
  rows = []
  for factor, ipc, method in grid:
    path = workdir / cell_name(factor, ipc, method) / "report.json"
    if not path.exists():
      continue
    r = json.loads(path.read_text())
    # A two-stage cell that compared classifiers: a row each, the cell's own architecture first
    # (`method [separate]`) with the cell's wall time, then the `extra` rows of the others.
    classifiers = r.get("classifiers") or {}
    own = r.get("two_stage_arch")
    order = sorted(classifiers, key=lambda name: name != own)
    labelled = ({f"{method} [{name}]": classifiers[name] for name in order} if classifiers
                else {method: r})
    for i, (label, figures) in enumerate(labelled.items()):
      row = {k: figures.get(k) for k in COLUMNS}
      row.update(dataset=r.get("dataset"), imbalance_factor=factor, ipc=ipc, method=label,
                 images=r.get("num_images"), per_class_acc=figures.get("per_class_acc"),
                 train_counts=figures.get("train_counts", r.get("train_counts")),
                 shot_classes=figures.get("shot_classes", r.get("shot_classes")),
                 learned_lr=learned_lr(r, method), wall_seconds=r.get("wall_seconds") if i == 0
                 else None, extra=i > 0)
      rows.append(row)
  return rows


def learned_lr(report: dict, method: str) -> str | None:
  """The student lr a distilled set carries, as the table shows it: one value for a flat set, one
  per objective (`groups`, `group_0`, ...) for a hierarchical one; None for the baselines, whose
  lr is the evaluation protocol's, not learned."""
  if not registry.parse(split_variant(method)[0]).distils:
    return None
  if report.get("learned_lrs"):
    return " / ".join(f"{k} {v:.3g}" for k, v in report["learned_lrs"].items())
  return None if report.get("lr") is None else f"{report['lr']:.3g}"


def _fmt(value, digits=1):
  if value is None or (isinstance(value, float) and not np.isfinite(value)):
    return "-"
  return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict]) -> str:
  """The results table: accuracy mean +- std, many/medium/few and the bias figures; under
  `relabel`, the share of the set's own images the teacher keeps in their class
  (`protocol.teacher_on_set`)."""
  head = ("| IF | IPC | method | images | acc (%) | many | medium | few | per-class std | "
          "head-tail gap | KL(pred||uniform) | group acc | within-group acc | learned lr | "
          "teacher keeps (%) |")
  lines = [head, "|" + "---|" * 15]
  for r in rows:
    lines.append(
        f"| {r['imbalance_factor']:g} | {_fmt(r['ipc'])} | {r['method']} | {_fmt(r['images'])} | "
        f"{_fmt(r['test_acc_mean'])} +- {_fmt(r['test_acc_std'])} | {_fmt(r['many_acc'])} | "
        f"{_fmt(r['medium_acc'])} | {_fmt(r['few_acc'])} | {_fmt(r['per_class_acc_std'])} | "
        f"{_fmt(r['head_tail_gap'])} | {_fmt(r['pred_kl_uniform'], 3)} | "
        f"{_fmt(r['group_acc'])} | {_fmt(r['within_group_acc'])} | {_fmt(r['learned_lr'])} | "
        f"{_fmt(r.get('teacher_set_acc'))} |")
  return "\n".join(lines) + "\n"


def summary_table(rows: list[dict]) -> str:
  """The grid at a glance (summary.md): one row per method, one column per (IF, IPC), test
  accuracy mean +- std, and in brackets the published figure for that method and cell where a
  paper reports one (`published.accuracy`: the published protocol, not our profile's). The whole
  long-tailed set (IPC None) shows under every IPC of its factor; a grid of it alone has no
  columns, and no table ("")."""
  distilled = [r for r in rows if r["ipc"] is not None]
  columns = list(dict.fromkeys((r["imbalance_factor"], r["ipc"]) for r in distilled))
  if not columns:
    return ""
  methods = list(dict.fromkeys(r["method"] for r in rows))
  table = {}
  for r in rows:
    value = ("-" if r["test_acc_mean"] is None
             else f"{_fmt(r['test_acc_mean'])} +- {_fmt(r['test_acc_std'])}")
    for factor, ipc in columns:
      if factor == r["imbalance_factor"] and r["ipc"] in (ipc, None):
        paper = published.accuracy(r["dataset"], factor, ipc, r["method"])
        table[r["method"], (factor, ipc)] = value + (f" ({paper})" if paper else "")
  lines = ["| method | " + " | ".join(f"IF {f:g} IPC {i}" for f, i in columns) + " |",
           "|---|" + "---|" * len(columns)]
  for m in methods:
    label = "whole LT set" if m == "full" else m
    lines.append(f"| {label} | " + " | ".join(table.get((m, c), "-") for c in columns) + " |")
  note = ("\n(x): the published figure, under the published protocol, not this profile "
          "(docs/published.md).\n" if any("(" in v for v in table.values()) else "")
  return "\n".join(lines) + "\n" + note


def time_summary(rows: list[dict], num_cells: int, failed: Sequence[str] = ()) -> str:
  """How many cells are done and the sum of their wall times: the grid's cost on this machine,
  however many resumptions it took (experts are timed inside the first cell that needs them);
  then the cells that diverged, if any."""
  seconds = sum(r["wall_seconds"] or 0.0 for r in rows)
  finished = sum(not r.get("extra") for r in rows)
  text = (f"{finished} of {num_cells} cells finished; sum of cell wall times {seconds:.0f} s "
          f"({seconds / 3600:.2f} h).\n")
  if failed:
    text += f"Diverged (see each cell's {FAILED}): {', '.join(failed)}.\n"
  return text


def write_tables(workdir: pathlib.Path, rows: list[dict], num_cells: int,
                 failed: Sequence[str] = ()) -> None:
  """results.csv (one row per finished cell), results.md (the table and the time summary) and
  summary.md (accuracy per method and cell, published figures beside: `summary_table`)."""
  with (workdir / "results.csv").open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  (workdir / "results.md").write_text(markdown_table(rows) + "\n" +
                                      time_summary(rows, num_cells, failed))
  (workdir / "summary.md").write_text(summary_table(rows) + "\n" +
                                      time_summary(rows, num_cells, failed))


def write_figures(workdir: pathlib.Path, rows: list[dict], config) -> None:
  """accuracy_heatmap.png (method x (IF, IPC)) and per_class_if<IF>.png for every factor."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  distilled = [r for r in rows if r["ipc"] is not None]
  if distilled:
    methods = list(dict.fromkeys(r["method"] for r in distilled))
    columns = list(dict.fromkeys((r["imbalance_factor"], r["ipc"]) for r in distilled))
    grid = np.full((len(methods), len(columns)), np.nan)
    for r in distilled:
      grid[methods.index(r["method"]), columns.index((r["imbalance_factor"], r["ipc"]))] = (
          r["test_acc_mean"])
    fig, ax = plt.subplots(figsize=(1.2 * len(columns) + 3, 0.4 * len(methods) + 1.5))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), [f"IF {f:g}\nIPC {i}" for f, i in columns], fontsize=7)
    ax.set_yticks(range(len(methods)), methods, fontsize=7)
    for (i, j), v in np.ndenumerate(grid):
      if np.isfinite(v):
        ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im, ax=ax, label="test accuracy (%)")
    fig.tight_layout()
    fig.savefig(workdir / "accuracy_heatmap.png", dpi=100)
    plt.close(fig)
  for factor in dict.fromkeys(r["imbalance_factor"] for r in rows):
    chosen = [r for r in rows if r["imbalance_factor"] == factor and r.get("per_class_acc")]
    if chosen:
      per_class_figure(workdir / f"per_class_if{factor:g}.png", chosen, factor)


def class_order(row: dict) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """The plotting order of a row's classes (decreasing training count; label order for reports
  without `train_counts`) and each shot band's positions in it (`shot_classes`, the report's own
  many / medium / few split; thirds of the order without it)."""
  num_classes = len(row["per_class_acc"])
  counts = row.get("train_counts")
  order = (np.argsort(-np.asarray(counts), kind="stable") if counts is not None
           else np.arange(num_classes))
  shots = row.get("shot_classes")
  if shots is None:
    return order, dict(zip(("many", "medium", "few"), np.array_split(np.arange(num_classes), 3)))
  position = np.argsort(order)  # class -> its place in the order
  return order, {band: np.sort(position[np.asarray(classes, int)]) for band, classes in shots.items()}


def per_class_figure(path: pathlib.Path, rows: list[dict], factor: float) -> None:
  """per_class_if<IF>.png: per-class accuracy of every row of one imbalance factor, one panel per
  IPC; a base method keeps its colour, its plug-ins change the line style, a variant row
  (`method@variant`) its marker. Classes go by
  decreasing training count; with more than `reporting.MANY_CLASSES` the lines are running means
  over C/10 classes, so 100 classes stay readable, and the report's many / medium / few classes
  are shaded."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  ipcs = list(dict.fromkeys(r["ipc"] for r in rows if r["ipc"] is not None)) or [None]
  parsed = {r["method"]: registry.parse(split_variant(r["method"])[0]) for r in rows}
  bases = list(dict.fromkeys(m.base.name for m in parsed.values()))
  styles = {(): "-", ("two_stage",): "--", ("hierarchical",): ":"}
  markers = {"[flat]": "x", "[separate]": "o", "[shared]": "s"}  # a cell's compared classifiers
  variants = [v for v in dict.fromkeys(split_variant(r["method"])[1] for r in rows) if v]
  order, bands = class_order(rows[0])
  num_classes = len(order)
  window = max(1, num_classes // 10) if num_classes > reporting.MANY_CLASSES else 1
  fig, axes = plt.subplots(1, len(ipcs), figsize=(4.5 * len(ipcs), 3.5), sharey=True,
                           squeeze=False)
  for ax, ipc in zip(axes[0], ipcs):
    if window > 1:
      for (band, places), shade in zip(bands.items(), ("0.93", "0.86", "0.93")):
        for place in places:
          ax.axvspan(place - 0.5, place + 0.5, color=shade, zorder=0, linewidth=0)
    for r in rows:
      if r["ipc"] not in (ipc, None):  # the full set (ipc None) shows in every panel
        continue
      m = parsed[r["method"]]
      acc = np.asarray(r["per_class_acc"], np.float64)[order]
      if window > 1:
        acc = np.convolve(acc, np.ones(window) / window, mode="valid")
      variant = split_variant(r["method"])[1]
      marker = markers.get(r["method"].rpartition(" ")[2],
                           "." if variant is None else "v^<>dp"[variants.index(variant) % 6])
      ax.plot(np.arange(len(acc)) + (window - 1) / 2, acc, marker=marker, markevery=max(1, window),
              markersize=4,
              linestyle=styles.get(tuple(p.name for p in m.plugins), "-."),
              color=f"C{bases.index(m.base.name) % 10}", label=r["method"])
    ax.set_title(f"IF {factor:g}, IPC {_fmt(ipc)}", fontsize=9)
    ax.set_xlabel("class (decreasing training count)"
                  + (f"; running mean of {window}" if window > 1 else ""))
  axes[0, 0].set_ylabel("test accuracy (%)")
  axes[0, -1].legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
