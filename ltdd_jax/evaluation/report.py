"""report.json: what one evaluation found, its per-class chart, and the line a launcher prints."""

from __future__ import annotations

import pathlib
import time

import numpy as np

from ltdd_jax import reporting
from ltdd_jax.evaluation import metrics

REPORT_FIELDS = ("method", "dataset", "imbalance_factor", "ipc", "test_acc_mean", "test_acc_std",
                 "per_class_acc", "many_acc", "medium_acc", "few_acc", "per_class_acc_std",
                 "head_tail_gap", "pred_kl_uniform", "wall_seconds")


def assemble_report(train_set, held_out, rows: dict[str, dict], num_models: int, start: float,
                    **extra) -> dict:
  """report.json's dict: the set's identity, the first architecture's metrics at top level, one
  row per architecture under `archs`, and any `extra` fields.

  Args:
    train_set: the evaluated `protocol.LabelledSet`.
    held_out: the `protocol.HeldOut` split it was tested on.
    rows: architecture -> `metrics.classification_metrics` figures (their accuracy keys are named
      for the split here: `metrics.named_for_split`).
    num_models: networks per architecture.
    start: `time.time()` when the evaluation started.
  """
  rows = {arch: metrics.named_for_split(r, held_out.split) for arch, r in rows.items()}
  first_arch = next(iter(rows))
  return {
      "method": train_set.method, "dataset": held_out.dataset, "split": held_out.split,
      "imbalance_factor": held_out.imbalance_factor, "ipc": train_set.ipc,
      **rows[first_arch], "arch": first_arch, "archs": rows, **extra,
      "num_images": len(train_set), "lr": float(train_set.lr), "epochs": int(train_set.epochs),
      "num_models": int(num_models), "wall_seconds": time.time() - start,
  }


def accuracy(report: dict) -> tuple[float, float]:
  """(mean, std) accuracy of a report, whichever split it was measured on."""
  prefix = metrics.SPLIT_PREFIX[report.get("split", "test")]
  return report[f"{prefix}_acc_mean"], report[f"{prefix}_acc_std"]


def write_report(workdir, report: dict, counts: np.ndarray, name: str = "report",
                 class_names=None) -> None:
  """Writes `<name>.json` and the per-class accuracy chart `<name>_per_class.png` (its x axis
  named with `class_names`)."""
  workdir = pathlib.Path(workdir)
  reporting.write_json(workdir / f"{name}.json", report)
  mean, std = accuracy(report)
  title = (f"{report['method']} on {report['dataset']} (IF {report['imbalance_factor']:g}, "
           f"IPC {report['ipc']}, {report.get('split', 'test')}): {mean:.1f} +- {std:.1f}%")
  reporting.per_class_chart(np.asarray(report["per_class_acc"]) / 100.0, counts,
                            workdir / f"{name}_per_class.png", title,
                            stds=np.asarray(report["per_class_acc_std_over_models"]) / 100.0,
                            class_names=class_names)


def format_report(report: dict) -> str:
  """One human line per architecture."""
  lines = []
  split = report.get("split", "test")
  for arch, r in report["archs"].items():
    mean, std = accuracy({**r, "split": split})
    lines.append(f"{report['method']} [{arch}] {split} {mean:.2f} +- {std:.2f}  "
                 f"many {r['many_acc']:.1f} medium {r['medium_acc']:.1f} few {r['few_acc']:.1f}  gap {r['head_tail_gap']:.1f}  "
                 f"KL {r['pred_kl_uniform']:.3f}")
  return "\n".join(lines)
