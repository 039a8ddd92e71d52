"""Side effects at the edge: config/metrics/report files, PNG grids and charts, progress lines."""

from __future__ import annotations

import json
import os
import pathlib
import sys
import threading
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


class WallClock:
  """Seconds a job has spent in a workdir over all its segments (every resumed run adds one).

  `start` records the running segment in `<workdir>/<name>` every `every` seconds from a daemon
  thread, so a segment killed by kill -9 still counts up to its last record; `stop` records it
  and stops."""

  def __init__(self, workdir, name: str = "wall_clock.json", every: float = 10.0,
               started: float | None = None):
    self.path = pathlib.Path(workdir) / name
    self.every = every
    try:
      self.earlier = [float(x) for x in json.loads(self.path.read_text())["segments"]]
    except (OSError, ValueError, KeyError, TypeError):
      self.earlier = []
    self.t0 = time.time() if started is None else started
    self._done = threading.Event()
    self._thread = None

  @property
  def segment(self) -> float:
    """Seconds of the running segment."""
    return time.time() - self.t0

  @property
  def total(self) -> float:
    """Seconds of every segment, the running one included."""
    return sum(self.earlier) + self.segment

  def record(self) -> None:
    write_json(self.path, {"segments": self.earlier + [self.segment]})

  def start(self) -> "WallClock":
    def tick():
      while not self._done.wait(self.every):
        self.record()
    self.record()
    self._thread = threading.Thread(target=tick, daemon=True)
    self._thread.start()
    return self

  def stop(self) -> None:
    self._done.set()
    if self._thread is not None:
      self._thread.join()
    self.record()


class Progress:
  """Prints `label i/n (..%) elapsed ETA` lines to stderr, at most every `every` seconds.

  The ETA comes from the steps after the first one this process ran: the first includes
  compilation, which the remaining steps do not pay again."""

  def __init__(self, label: str, total: int, start: int = 0, every: float = 5.0):
    self.label, self.total, self.start, self.every = label, total, start, every
    self.t0 = time.time()
    self.last = 0.0
    self.first = None  # (steps done, time) after the first step: the ETA's origin

  def note(self, text: str) -> None:
    """One line about the loop (e.g. what it resumes from)."""
    print(f"[{self.label}] {text}", file=sys.stderr, flush=True)

  def update(self, done: int, extra: str = "", force: bool = False) -> None:
    now = time.time()
    if self.first is None:
      self.first = (done, now)
    if not force and now - self.last < self.every and done < self.total:
      return
    self.last = now
    elapsed = now - self.t0
    steps, since = done - self.first[0], now - self.first[1]
    if steps > 0 and since > 0:
      eta = f"ETA {(self.total - done) * since / steps:.0f}s"
    else:
      eta = "ETA -- (the first step compiles)" if done < self.total else "ETA 0s"
    print(f"[{self.label}] {done}/{self.total} ({100 * done / max(self.total, 1):.0f}%) "
          f"elapsed {elapsed:.0f}s {eta} {extra}", file=sys.stderr, flush=True)


def image_grid(pixels: np.ndarray, labels: np.ndarray, path: str | os.PathLike,
               per_class: int = 10, title: str = "", row_names=None) -> None:
  """Writes a PNG grid, one row per class. pixels: [N, H, W, C] in ~[0, 1]; labels: [N] ints;
  `row_names`: a label per class (default: the class id) written beside its row."""
  labels = np.asarray(labels)
  classes = np.unique(labels)
  cols = max(1, min(per_class, max(int((labels == c).sum()) for c in classes)))
  names = [str(c) if row_names is None else str(row_names[c]) for c in classes]
  label_width = 0.0 if row_names is None else min(3.0, 0.07 * max(len(n) for n in names) + 0.3)
  fig, axes = plt.subplots(len(classes), cols, squeeze=False,
                           figsize=(max(cols * 0.8, 3.0) + label_width, len(classes) * 0.8))
  for r, c in enumerate(classes):
    idx = np.flatnonzero(labels == c)[:cols]
    for j in range(cols):
      ax = axes[r, j]
      ax.axis("off")
      if j < len(idx):
        img = np.clip(pixels[idx[j]], 0, 1)
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1
                  else None, interpolation="nearest")
    if row_names is None:
      axes[r, 0].set_title(names[r], fontsize=6, loc="left")
    else:
      axes[r, 0].text(-0.1, 0.5, names[r], transform=axes[r, 0].transAxes, ha="right",
                      va="center", fontsize=7)
  if title:
    fig.suptitle(title, fontsize=8)
  fig.tight_layout()
  if label_width:
    fig.subplots_adjust(left=label_width / fig.get_size_inches()[0])
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def class_ticks(num_classes: int, limit: int = 20) -> np.ndarray:
  """Which classes a chart's x axis names: all of them up to `limit`, else every k-th."""
  return np.arange(0, num_classes, max(1, -(-num_classes // limit)))


MANY_CLASSES = 20  # above this, per-class charts order classes by count and mark thirds


def count_bands(counts) -> tuple[np.ndarray, list[np.ndarray]]:
  """(class order by decreasing training count, the many / medium / few thirds of that order)."""
  order = np.argsort(-np.asarray(counts), kind="stable")
  return order, np.array_split(np.arange(len(order)), 3)


def per_class_chart(per_class_acc, counts, path: str | os.PathLike, title: str = "",
                    stds=None, class_names=None) -> None:
  """Bar chart of per-class accuracy (left axis) with the class's training count (right axis),
  at least 800 px wide, its x axis labelled with the class names (`class_names`; default ids).
  With more than `MANY_CLASSES` classes (CIFAR-100) the classes go by decreasing count, every
  k-th is named, and the many / medium / few thirds are shaded with their mean accuracy."""
  per_class_acc = np.asarray(per_class_acc)
  counts = np.asarray(counts)
  names = ([str(c) for c in range(len(per_class_acc))] if class_names is None
           else [str(n) for n in class_names])
  many = len(per_class_acc) > MANY_CLASSES
  order, bands = count_bands(counts) if many else (np.arange(len(per_class_acc)), [])
  x = np.arange(len(per_class_acc))
  fig, ax = plt.subplots(figsize=(10.0 if many else max(8.0, len(x) * 0.4), 3.5))
  ax.bar(x, 100 * per_class_acc[order],
         yerr=None if stds is None else 100 * np.asarray(stds)[order],
         color="tab:blue", alpha=0.8, width=0.8)
  for band, label, shade in zip(bands, ("many", "medium", "few"), ("0.93", "0.86", "0.93")):
    ax.axvspan(band[0] - 0.5, band[-1] + 0.5, color=shade, zorder=0)
    mean = 100 * per_class_acc[order[band]].mean()
    ax.hlines(mean, band[0] - 0.5, band[-1] + 0.5, colors="k", linestyles="--", linewidth=1)
    ax.text(band.mean(), 96, f"{label} {mean:.1f}%", ha="center", va="top", fontsize=8)
  ticks = class_ticks(len(x))
  ax.set_xticks(ticks, [names[order[t]] for t in ticks], rotation=45 if len(x) > 5 else 0,
                ha="right" if len(x) > 5 else "center", fontsize=7)
  ax.set_xlabel("class (by decreasing training count)" if many else "class (label order)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_ylim(0, 100)
  twin = ax.twinx()
  twin.plot(x, counts[order], "o-" if not many else "-", color="tab:red", markersize=3)
  twin.set_ylabel("training images", color="tab:red")
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
