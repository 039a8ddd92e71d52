import os
import subprocess
import sys

from ltdd_jax import host_memory

GLIBC = host_memory._mallopt() is not None  # pylint: disable=protected-access
TUNABLE = host_memory.HUGE_PAGE_TUNABLE


def test_huge_pages_wanted_only_once_and_never_against_the_user():
  assert host_memory.huge_pages_wanted({}, "always [madvise] never", glibc=True)
  assert host_memory.huge_pages_wanted({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "[always]",
                                       glibc=True)
  assert not host_memory.huge_pages_wanted({}, "always madvise [never]", glibc=True)  # THP off
  assert not host_memory.huge_pages_wanted({}, None, glibc=True)  # no THP at all
  assert not host_memory.huge_pages_wanted({}, "[always]", glibc=False)  # another C library
  # After the restart (or the user's own choice, 0 included) there is no second one.
  assert not host_memory.huge_pages_wanted({"GLIBC_TUNABLES": TUNABLE}, "[always]", glibc=True)
  assert not host_memory.huge_pages_wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},
                                           "[always]", glibc=True)


def test_restart_keeps_the_command_line_and_adds_the_tunable(monkeypatch):
  calls = []
  monkeypatch.setattr(host_memory, "huge_pages_wanted", lambda environ, mode, glibc: True)
  monkeypatch.setattr(os, "execve", lambda *args: calls.append(args))
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
  monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "launch.pipeline", "--workdir=W"])
  host_memory.restart_with_huge_pages()
  (executable, argv, env), = calls
  assert executable == sys.executable
  assert argv == [sys.executable, "-m", "launch.pipeline", "--workdir=W"]
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + TUNABLE
  monkeypatch.setattr(host_memory, "huge_pages_wanted", lambda environ, mode, glibc: False)
  host_memory.restart_with_huge_pages()
  assert len(calls) == 1


def test_a_launcher_restarts_once_and_still_reports_a_bad_command_line_once(tmp_path):
  """The real restart (where glibc and huge pages allow it): a bad flag still gives its one-line
  error and exit status 2, printed once."""
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  proc = subprocess.run([sys.executable, "-m", "launch.pipeline", "--config=configs/digits_lt.py",
                         f"--workdir={tmp_path}", "--config.no_such_key=1"],
                        capture_output=True, text=True, env=env)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.count("error: unknown config key") == 1 and "Traceback" not in proc.stderr


def test_launched_module_is_the_module_of_python_dash_m(monkeypatch):
  spec = type("Spec", (), {"name": "launch.pipeline"})()
  monkeypatch.setattr(sys.modules["__main__"], "__spec__", spec, raising=False)
  monkeypatch.setattr(sys, "orig_argv", ["python", "-u", "-m", "launch.pipeline", "--workdir=W"])
  assert host_memory.launched_module() == "launch.pipeline"
  monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "pdb", "-m", "launch.pipeline"])
  assert host_memory.launched_module() is None  # a wrapper's run: no restart of the wrapper
  monkeypatch.setattr(sys.modules["__main__"], "__spec__", None, raising=False)
  assert host_memory.launched_module() is None


def test_retaining_freed_buffers_applies_exactly_on_glibc():
  assert host_memory.retain_freed_buffers() == GLIBC
