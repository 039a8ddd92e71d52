import json
import subprocess
import sys
from conftest import CLI_DSA


def test_inspect_data_cli(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "launch.inspect_data", "--config=configs/digits_lt.py", CLI_DSA,
       f"--workdir={tmp_path}"], capture_output=True, text=True, check=True)
  assert "imbalance" in proc.stdout
  summary = json.loads((tmp_path / "data_summary.json").read_text())
  assert summary["num_classes"] == 10 and summary["train_counts"][0] > summary["train_counts"][-1]
  assert (tmp_path / "data_grid.png").stat().st_size > 1000
