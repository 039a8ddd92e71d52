"""bench/wall_split.py: a cell's time split, a resumed distillation summed over its segments."""

import importlib.util
import json
import pathlib

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "bench" / "wall_split.py"
spec = importlib.util.spec_from_file_location("wall_split", SCRIPT)
wall_split = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wall_split)


def write_cell(folder: pathlib.Path, records: list[dict], wall: float) -> None:
  folder.mkdir(parents=True)
  (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  (folder / "report.json").write_text(json.dumps({"wall_seconds": wall}))


def test_one_segment_takes_the_done_record_and_a_resumed_one_sums_its_segments(tmp_path):
  one = [{"stage": "experts", "step": 40, "seconds": 900.0},
         {"stage": "distill", "step": 100, "seconds": 200.0},
         {"stage": "distill", "step": 200, "seconds": 400.0},
         {"stage": "distill_done", "step": 200, "seconds": 410.0}]
  write_cell(tmp_path / "if100_ipc10_mtt", one, wall=1400.0)
  times = wall_split.cell_times(tmp_path / "if100_ipc10_mtt")
  assert times["training"] == {"experts": 900.0} and times["distill"] == 410.0
  assert times["rest"] == 1400.0 - 900.0 - 410.0 and times["segments"] == 1
  # Stopped after iteration 100's checkpoint; the resumed segment's clock starts again.
  resumed = [{"stage": "distill", "step": 100, "seconds": 200.0},
             {"stage": "distill", "step": 200, "seconds": 190.0},
             {"stage": "distill_done", "step": 200, "seconds": 195.0}]
  assert wall_split.distill_seconds(resumed) == (200.0 + 195.0, 2)
  # Resumed after the last checkpoint: the done record times only the setup.
  assert wall_split.distill_seconds([*one[1:3], {**one[3], "seconds": 3.0}]) == (400.0, 1)
  # A cell that evaluates another cell's set distils nothing.
  assert wall_split.distill_seconds([{"stage": "distill_done", "step": 200, "seconds": 2.0}]) == (
      None, 1)
  (tmp_path / "restored").mkdir()
  (tmp_path / "restored" / "report.json").write_text(json.dumps({"wall_seconds": 60.0}))
  assert wall_split.cell_times(tmp_path / "restored")["rest"] is None
  assert wall_split.cell_times(tmp_path / "if100_ipc1_mtt") is None  # not finished
  assert wall_split.parse_name("if100_experts") is None
  assert wall_split.parse_name("if10_ipc1_ltdd@no_dam") == ("10", "1", "ltdd@no_dam")
