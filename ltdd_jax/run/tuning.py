"""Choosing settings on the validation split: a resumable search over config values.

Each candidate (one value per searched key, every combination of `tuning.search`) is a full run
(experts -> distillation -> evaluation) in `<workdir>/<candidate>/`, evaluated on the validation
split only (`validation_report.json`); experts are shared by every candidate whose expert settings
agree, and a distillation by every candidate whose distillation settings agree (a search over
evaluation-only keys, e.g. the grouping of `+two_stage`, distils once). The choice is the candidate with the highest validation accuracy; the test split is never
read. `selection.md` / `selection.csv` list what was tried, `selection.json` the choice.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import pathlib

from ltdd_jax import errors, reporting
from ltdd_jax.run import checks, locks, pipeline, resume

COLUMNS = ("candidate", "val_acc_mean", "val_acc_std", "many_acc", "medium_acc", "few_acc",
           "per_class_acc_std", "head_tail_gap", "group_acc", "learned_lrs")


def searched_values(tuning_config) -> dict[str, tuple]:
  """{'section.key': (v1, ...)} from the nested `tuning.search` (e.g. search.grouping.lambda_1)."""
  flat = resume.flatten(tuning_config.search)
  return {k: tuple(v) if isinstance(v, (list, tuple)) else (v,) for k, v in flat.items()}


def candidates(tuning_config) -> list[dict]:
  """Every combination of the searched values, in a fixed order."""
  searched = searched_values(tuning_config)
  keys = sorted(searched)
  if not keys:
    raise errors.InputError("tuning.search is empty: give each key to search a tuple of values, "
                            "e.g. --config.tuning.search.grouping.lambda_1='(0.5, 1.0)'.")
  for key in keys:
    if not searched[key]:
      raise errors.InputError(f"tuning.search.{key} has no values to try.")
  return [dict(zip(keys, combo)) for combo in itertools.product(*(searched[k] for k in keys))]


def candidate_name(values: dict) -> str:
  """A folder name for one candidate: its key=value pairs."""
  return "_".join(f"{k}={v}" for k, v in values.items()).replace("/", "-").replace(" ", "")


def candidate_config(config, values: dict, workdir: pathlib.Path):
  """The run config of one candidate: the base config with `values` set; shared expert folder."""
  c = config.copy_and_resolve_references()
  known = resume.flatten(c)
  for key in values:
    if key not in known:
      raise errors.InputError(f"tuning.search names {key!r}, which is not a config key.")
  c.update_from_flattened_dict(values)
  if not c.experts.directory:  # Candidates whose experts would be the same share them.
    key = json.dumps(resume.stage_values(c, "experts", classifier=True), sort_keys=True)
    c.experts.directory = str(workdir / f"experts_{hashlib.sha1(key.encode()).hexdigest()[:10]}")
  return c


def run_search(config, workdir) -> dict:
  """Runs every unfinished candidate on the validation split; writes the table and the choice.

  Returns:
    {'chosen': values of the best candidate, 'rows': one row per finished candidate}.
  """
  workdir = pathlib.Path(workdir)
  grid = candidates(config.tuning)
  configs = [candidate_config(config, v, workdir) for v in grid]
  for c in configs:  # Every candidate is checked before the first one trains anything.
    checks.check_config(c)
  folders = {workdir / candidate_name(v): (i, v, c) for i, (v, c) in enumerate(zip(grid, configs))}
  done = lambda folder: (folder / "validation_report.json").exists()
  for cell in locks.each_free(folders, done, "candidate"):  # Locked while it runs.
    i, values, c = folders[cell]
    print(f"[tuning] candidate {i + 1}/{len(grid)}: {values}", flush=True)
    if resume.copy_distillation(same_distillation(c, cell, folders), cell):
      print(f"[tuning] candidate {i + 1} takes the distillation of an earlier one", flush=True)
    ctx = pipeline.setup(c, cell)
    syn = pipeline.stage_distill(ctx)
    pipeline.stage_evaluate(ctx, "synthetic", ctx.method.two_stage, "validation", syn=syn)
  rows = collect(workdir, grid)
  chosen = choose(rows)
  write_tables(workdir, rows, len(grid), chosen)
  return {"chosen": chosen, "rows": rows}


def same_distillation(config, folder: pathlib.Path, folders: dict) -> pathlib.Path | None:
  """Another candidate's folder holding a finished distillation made with the same distillation
  settings (and as many iterations) as `config`'s, or None."""
  key = lambda c: (resume.stage_values(c, "distill"), c.distill.iterations)
  wanted = key(config)
  for other, (_, _, other_config) in folders.items():
    if other != folder and (other / "synthetic.npz").exists() and key(other_config) == wanted:
      return other
  return None


def collect(workdir: pathlib.Path, grid) -> list[dict]:
  """One row per finished candidate, from its validation report (never the test report)."""
  rows = []
  for values in grid:
    path = workdir / candidate_name(values) / "validation_report.json"
    if not path.exists():
      continue
    r = json.loads(path.read_text())
    if r.get("split") != "validation":
      raise errors.InputError(f"{path} is not a validation-split report; delete it and rerun.")
    rows.append({"candidate": values, "val_acc_mean": r["val_acc_mean"],
                 "val_acc_std": r["val_acc_std"],
                 **{k: r.get(k) for k in COLUMNS[3:]}})
  return rows


def choose(rows: list[dict]) -> dict | None:
  """The values of the row with the highest validation accuracy (ties: the first tried)."""
  finite = [r for r in rows if r["val_acc_mean"] == r["val_acc_mean"]]  # drop NaN
  if not finite:
    return None
  return max(finite, key=lambda r: r["val_acc_mean"])["candidate"]


def write_tables(workdir: pathlib.Path, rows: list[dict], total: int, chosen) -> None:
  """selection.csv, selection.md (best first) and selection.json."""
  with (workdir / "selection.csv").open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    for r in rows:
      writer.writerow({**r, "candidate": json.dumps(r["candidate"]),
                       "learned_lrs": json.dumps(r.get("learned_lrs"))})
  fmt = lambda v: "-" if v is None else f"{v:.1f}"
  lines = ["| candidate | val acc (%) | many | medium | few | per-class std | gap | group acc |",
           "|---|---|---|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: -r["val_acc_mean"]):
    mark = " (chosen)" if r["candidate"] == chosen else ""
    lines.append(f"| {candidate_name(r['candidate'])}{mark} | {r['val_acc_mean']:.1f} +- "
                 f"{r['val_acc_std']:.1f} | {fmt(r['many_acc'])} | {fmt(r['medium_acc'])} | "
                 f"{fmt(r['few_acc'])} | {fmt(r['per_class_acc_std'])} | "
                 f"{fmt(r['head_tail_gap'])} | {fmt(r['group_acc'])} |")
  lines += ["", f"{len(rows)} of {total} candidates finished; chosen on the validation split: "
            f"{chosen}."]
  (workdir / "selection.md").write_text("\n".join(lines) + "\n")
  reporting.write_json(workdir / "selection.json", {"chosen": chosen, "finished": len(rows),
                                                    "candidates": total, "split": "validation"})
