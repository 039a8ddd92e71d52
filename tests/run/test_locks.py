import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from ltdd_jax.run import locks

REPO = pathlib.Path(__file__).resolve().parents[2]
HOLD = ("import sys, time; from ltdd_jax.run import locks; locks.acquire(sys.argv[1]); "
        "print('held', flush=True); time.sleep(120)")


def _holder(folder):
  proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE,
                          text=True, cwd=REPO)
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_a_second_process_fails_before_loading_jax_and_a_killed_holder_holds_nothing(tmp_path):
  workdir = tmp_path / "run"
  holder = _holder(workdir)
  try:
    # A `jax` that cannot be imported: the second run must fail on the lock before importing it.
    (tmp_path / "nojax").mkdir()
    (tmp_path / "nojax" / "jax.py").write_text("raise ImportError('jax was imported')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'nojax'}{os.pathsep}{REPO}"}
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "launch.pipeline", "--config=configs/digits_lt.py",
                           f"--workdir={workdir}"], capture_output=True, text=True, env=env,
                          cwd=REPO)
    seconds = time.time() - start
    assert proc.returncode == 1, proc.stderr
    assert f"in use by PID {holder.pid}" in proc.stderr and "jax was imported" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    print(f"second process failed after {seconds:.2f}s")
    with pytest.raises(locks.LockedError, match=f"PID {holder.pid}"):
      locks.acquire(workdir)
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  locks.acquire(workdir)  # kill -9 left no stale lock
  locks.release(workdir)


def test_each_free_splits_folders_with_another_process_and_waits_for_its_own(tmp_path):
  folders = [tmp_path / f"cell{i}" for i in range(3)]
  holder = _holder(folders[1])
  done = set()
  try:
    seen = []
    for folder in locks.each_free(folders, lambda f: f in done):
      seen.append(folder.name)
      if folder.name == "cell2":  # the other process finishes its cell meanwhile
        done.add(folders[1])
        holder.send_signal(signal.SIGKILL)
        holder.wait()
      done.add(folder)
    assert seen == ["cell0", "cell2"]  # cell1 was the other process's, and it finished it
  finally:
    holder.kill()
  seen = [f.name for f in locks.each_free(folders, lambda f: False)]
  assert seen == ["cell0", "cell1", "cell2"]  # nothing held: every folder, once


def test_held_is_reentrant_and_keeps_an_outer_lock(tmp_path):
  locks.acquire(tmp_path / "w")
  with locks.held(tmp_path / "w", "workdir"):
    pass
  assert os.path.realpath(tmp_path / "w") in locks._held  # the outer lock is still held
  locks.release(tmp_path / "w")
  with locks.held(tmp_path / "x", "expert set"):
    assert os.path.realpath(tmp_path / "x") in locks._held
  assert os.path.realpath(tmp_path / "x") not in locks._held
