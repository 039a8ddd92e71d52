"""Where a benchmark grid's wall time went: model training, distillation or synthesis, the rest.

  python bench/wall_split.py --workdir=runs/final/cifar10

Reads each finished cell's `report.json` and `metrics.jsonl` (a cell restored from records has no
metrics: its parts show "-"). Model training is the flat experts (`experts`, with LTDD's
classifier experts only where the same cell trained the flat set; otherwise those fall in "rest")
or the observer and teacher (`observers`), timed inside the first cell of its factor that needed
them. Distillation is the trajectory-matching stage (initialisation and iterations; a
`+hierarchical` cell's group experts too) or the statistics-matching one (recalibration, crop
scoring, Adam on the pixels); a cell that evaluates another cell's set shows "-". "rest" is the
cell's wall time less both (evaluation, data, compilation). A trajectory-matching distillation
resumed across sessions is the sum of its segments (the work lost after a segment's last
checkpoint not counted); a statistics-matching synthesis (about a minute) counts its last segment
only. Then, per factor and IPC, the statistics-matching method's model training + synthesis
against MTT's experts + distillation, as a ratio.
"""

import argparse
import json
import os
import pathlib
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ltdd_jax import reporting  # pylint: disable=g-import-not-at-top,wrong-import-position


def distill_seconds(records: list[dict]) -> tuple[float | None, int]:
  """(seconds, segments) of a cell's distillation: the `distill_done` record's own time when it ran
  in one segment; the sum of each segment's last `distill` record where a resume reset the clock
  (a `seconds` value below its predecessor starts a segment)."""
  done = [r["seconds"] for r in records if r.get("stage") == "distill_done" and "seconds" in r]
  steps = [r["seconds"] for r in records if r.get("stage") == "distill" and "seconds" in r]
  synthesized = any(r.get("stage") == "synthesize" for r in records)
  if not steps and not synthesized:  # another cell's set, or no distillation
    return None, 1
  segments, total = 1, 0.0
  for before, after in zip(steps, steps[1:]):
    if after < before:
      segments, total = segments + 1, total + before
  last = max([*steps[-1:], *done[:1]], default=None)  # a done record of a setup-only resume
  return (None if last is None else total + last), segments


def cell_times(cell: pathlib.Path) -> dict | None:
  """A finished cell's wall time and its parts in seconds: `training` holds the model trainings the
  cell timed, `distill` is None where it distilled nothing, `rest` None without metrics."""
  report = cell / "report.json"
  if not report.exists():
    return None
  wall = json.loads(report.read_text()).get("wall_seconds")
  metrics = cell / "metrics.jsonl"
  if not metrics.exists():  # restored from records: only its wall time is known
    return {"wall": wall, "training": {}, "distill": None, "segments": 1, "rest": None}
  records = reporting.MetricsWriter(cell).lines()
  training = {s: r["seconds"] for r in records for s in ("experts", "observers")
              if r.get("stage") == s and "seconds" in r}
  distill, segments = distill_seconds(records)
  return {"wall": wall, "training": training, "distill": distill, "segments": segments,
          "rest": None if wall is None else wall - sum(training.values()) - (distill or 0.0)}


def parse_name(name: str) -> tuple[str, str, str] | None:
  """`if100_ipc10_mtt` -> ('100', '10', 'mtt'); None for any other folder (experts, and the
  whole-set cells `if100_full`, which distil nothing)."""
  parts = name.split("_", 2)
  if len(parts) != 3 or not parts[0].startswith("if") or not parts[1].startswith("ipc"):
    return None
  return parts[0][2:], parts[1][3:], parts[2]


def fmt(value) -> str:
  return "-" if value is None else f"{value:.0f}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  args = parser.parse_args()
  workdir = pathlib.Path(args.workdir)
  cells = {}
  print("| cell | wall s | experts s | observers s | distillation s | rest s |")
  print("|---|---|---|---|---|---|")
  for folder in sorted(p for p in workdir.iterdir() if p.is_dir()):
    name = parse_name(folder.name)
    times = cell_times(folder) if name else None
    if times is None:
      continue
    cells[name] = times
    t = times["training"]
    resumed = f" ({times['segments']} segments)" if times["segments"] > 1 else ""
    print(f"| {folder.name} | {fmt(times['wall'])} | {fmt(t.get('experts'))} | "
          f"{fmt(t.get('observers'))} | {fmt(times['distill'])}{resumed} | {fmt(times['rest'])} |")
  experts = {f: t["training"]["experts"] for (f, _, _), t in cells.items()
             if "experts" in t["training"]}
  observers = {f: t["training"]["observers"] for (f, _, _), t in cells.items()
               if "observers" in t["training"]}
  print("\n| IF | IPC | MTT: experts + distillation s | statistics matching: observers + "
        "synthesis s | ratio |")
  print("|---|---|---|---|---|")
  for (factor, ipc, method), t in sorted(cells.items(), key=lambda c: (-float(c[0][0]),
                                                                         -int(c[0][1]))):
    if method != "mtt" or (factor, ipc, "unilevel") not in cells:
      continue
    mtt = experts.get(factor, 0.0) + (t["distill"] or 0.0)
    uni = observers.get(factor, 0.0) + (cells[factor, ipc, "unilevel"]["distill"] or 0.0)
    if factor not in experts or factor not in observers:
      print(f"| {factor} | {ipc} | {mtt:.0f} | {uni:.0f} | - (model training not timed here) |")
    else:
      print(f"| {factor} | {ipc} | {mtt:.0f} | {uni:.0f} | {uni / mtt:.2f} |")


if __name__ == "__main__":
  main()
