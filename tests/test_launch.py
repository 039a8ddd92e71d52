"""The launchers end with one line for a bad command line (SIGINT: tests/methods/test_distill.py)."""

import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(args, tmp_path):
  return subprocess.run([sys.executable, "-m", *args, f"--config.data.cache_dir={tmp_path}/cache"],
                        capture_output=True, text=True, cwd=REPO)


@pytest.mark.parametrize("args,message", [
    (["--config=configs/digits_lt.py", "--config.distill.ipcc=3"],
     "unknown config key 'distill.ipcc' (--config.distill.ipcc=...); did you mean 'distill.ipc'?"),
    (["--config=configs/digits_lt.py", "--config.two_stage.arhc=shared"],
     "unknown config key 'two_stage.arhc'"),
    (["--config=configs/nonexistent.py"], "no config file 'configs/nonexistent.py'"),
    (["--config=configs/digits_lt.py:profil=cpu"], "Unknown config argument 'profil'"),
    (["--config=configs/digits_lt.py", "--config.distill.ipc=abc"],
     "--config.distill.ipc=abc: invalid literal"),
])
def test_a_bad_command_line_is_one_line(tmp_path, args, message):
  proc = _run(["launch.inspect_data", *args, f"--workdir={tmp_path / 'w'}"], tmp_path)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines() == [f"error: {proc.stderr.strip()[7:]}"]
  assert message in proc.stderr and "Traceback" not in proc.stderr
