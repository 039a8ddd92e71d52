import json

import numpy as np
from PIL import Image

from ltdd_jax import reporting


def test_eta_leaves_out_the_first_step(capsys, monkeypatch):
  clock = iter([0.0, 100.0, 101.0, 102.0])  # the first step compiles: 100 s, then 1 s a step
  monkeypatch.setattr(reporting.time, "time", lambda: next(clock))
  progress = reporting.Progress("loop", total=10, every=0.0)
  progress.update(1)
  progress.update(2)
  progress.update(3)
  lines = capsys.readouterr().err.splitlines()
  assert "ETA --" in lines[0]
  assert "ETA 8s" in lines[1] and "ETA 7s" in lines[2]  # 1 s a step, not (100 + 1) / 2


def test_wall_clock_sums_every_segment(tmp_path):
  import time  # pylint: disable=g-import-not-at-top
  first = reporting.WallClock(tmp_path, started=time.time() - 50).start()  # ran 50 s, then
  first.stop()  # killed: its last record is what a kill -9 leaves
  second = reporting.WallClock(tmp_path, started=time.time() - 30)  # the rerun that resumes it
  assert len(second.earlier) == 1 and 50 <= second.earlier[0] < 60
  assert 80 <= second.total < 95 and 30 <= second.segment < 40
  second.start().stop()
  segments = json.loads((tmp_path / "wall_clock.json").read_text())["segments"]
  assert len(segments) == 2 and 80 <= sum(segments) < 95


def test_per_class_chart_names_classes_and_is_wide_enough(tmp_path, monkeypatch):
  ticks = {}
  original = reporting.plt.Axes.set_xticks
  def recording(self, positions, labels=None, **kwargs):
    ticks["labels"] = list(labels)
    return original(self, positions, labels, **kwargs)
  monkeypatch.setattr(reporting.plt.Axes, "set_xticks", recording)
  names = [f"class_{c}" for c in range(100)]
  reporting.per_class_chart(np.full(100, 0.5), np.arange(100, 0, -1), tmp_path / "c.png",
                            class_names=names)
  assert ticks["labels"] == names[::5]  # 100 classes: every 5th named
  assert Image.open(tmp_path / "c.png").size[0] >= 800
  reporting.per_class_chart(np.full(10, 0.5), np.arange(10, 0, -1), tmp_path / "d.png",
                            class_names=names[:10])
  assert ticks["labels"] == names[:10] and Image.open(tmp_path / "d.png").size[0] >= 800


def test_per_class_chart_of_100_classes_stays_chart_sized(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  counts = (500 * 50.0 ** (-np.arange(100) / 99)).astype(int)
  acc = np.linspace(0.9, 0.1, 100)
  reporting.per_class_chart(acc, counts, tmp_path / "c100.png", "CIFAR-100-LT",
                            class_names=[f"class{c}" for c in range(100)])
  width, height = Image.open(tmp_path / "c100.png").size
  assert width == 1000 and height == 350  # not 100 x 0.4 inches wide
  order, bands = reporting.count_bands(counts[::-1])
  assert order[0] == 99 and [len(b) for b in bands] == [34, 33, 33]
