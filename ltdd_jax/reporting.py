"""Side effects at the edge: config/metrics/report files, PNG grids and charts, progress lines."""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np


def to_jsonable(value):
  """numpy scalars/arrays and tuples -> plain JSON types."""
  if isinstance(value, dict):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return to_jsonable(value.tolist())
  if isinstance(value, np.generic):
    return value.item()
  return value


def write_json(path: str | os.PathLike, value) -> None:
  """Writes JSON atomically (a crash never leaves half a file)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(to_jsonable(value), indent=2) + "\n")
  os.replace(tmp, path)


class MetricsWriter:
  """Appends one JSON object per line to `metrics.jsonl`."""

  def __init__(self, workdir: str, name: str = "metrics.jsonl"):
    self.path = pathlib.Path(workdir) / name
    self.path.parent.mkdir(parents=True, exist_ok=True)

  def write(self, stage: str, step: int, **values) -> None:
    with self.path.open("a") as f:
      f.write(json.dumps(to_jsonable({"stage": stage, "step": step, **values})) + "\n")

  def lines(self) -> list[dict]:
    """Every record written so far (a torn last line from a crash is skipped)."""
    if not self.path.exists():
      return []
    out = []
    for line in self.path.read_text().splitlines():
      try:
        out.append(json.loads(line))
      except ValueError:
        continue
    return out

  def write_once(self, stage: str, step: int, **values) -> None:
    """`write`, unless a record of this stage and step is already there (a resumed run)."""
    if not any(r.get("stage") == stage and r.get("step") == step for r in self.lines()):
      self.write(stage, step, **values)

  def drop_after(self, stages: tuple[str, ...], step: int) -> None:
    """Removes the records of `stages` past `step`: a run resuming from its checkpoint at `step`
    writes them again, so they appear once."""
    kept = [r for r in self.lines() if not (r.get("stage") in stages and r.get("step", 0) > step)]
    tmp = self.path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, self.path)


class Progress:
  """Prints `label i/n (..%) elapsed ETA` lines to stderr, at most every `every` seconds."""

  def __init__(self, label: str, total: int, start: int = 0, every: float = 5.0):
    self.label, self.total, self.start, self.every = label, total, start, every
    self.t0 = time.time()
    self.last = 0.0

  def update(self, done: int, extra: str = "", force: bool = False) -> None:
    now = time.time()
    if not force and now - self.last < self.every and done < self.total:
      return
    self.last = now
    elapsed = now - self.t0
    rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
    eta = (self.total - done) / rate if rate > 0 else float("nan")
    print(f"[{self.label}] {done}/{self.total} ({100 * done / max(self.total, 1):.0f}%) "
          f"elapsed {elapsed:.0f}s ETA {eta:.0f}s {extra}", file=sys.stderr, flush=True)


def image_grid(pixels: np.ndarray, labels: np.ndarray, path: str | os.PathLike,
               per_class: int = 10, title: str = "") -> None:
  """Writes a PNG grid, one row per class. pixels: [N, H, W, C] in ~[0, 1]; labels: [N] ints."""
  labels = np.asarray(labels)
  classes = np.unique(labels)
  cols = max(1, min(per_class, max(int((labels == c).sum()) for c in classes)))
  fig, axes = plt.subplots(len(classes), cols, figsize=(max(cols * 0.8, 3.0), len(classes) * 0.8),
                           squeeze=False)
  for r, c in enumerate(classes):
    idx = np.flatnonzero(labels == c)[:cols]
    for j in range(cols):
      ax = axes[r, j]
      ax.axis("off")
      if j < len(idx):
        img = np.clip(pixels[idx[j]], 0, 1)
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1
                  else None, interpolation="nearest")
    axes[r, 0].set_title(str(c), fontsize=6, loc="left")
  if title:
    fig.suptitle(title, fontsize=8)
  fig.tight_layout()
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def per_class_chart(per_class_acc, counts, path: str | os.PathLike, title: str = "",
                    stds=None) -> None:
  """Bar chart of per-class accuracy (left axis) with the class's training count (right axis)."""
  per_class_acc = np.asarray(per_class_acc)
  x = np.arange(len(per_class_acc))
  fig, ax = plt.subplots(figsize=(max(4, len(x) * 0.35), 3))
  ax.bar(x, 100 * per_class_acc, yerr=None if stds is None else 100 * np.asarray(stds),
         color="tab:blue", alpha=0.8)
  ax.set_xlabel("class (label order)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_ylim(0, 100)
  twin = ax.twinx()
  twin.plot(x, counts, "o-", color="tab:red", markersize=3)
  twin.set_ylabel("training images", color="tab:red")
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
