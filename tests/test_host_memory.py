import os
import sys

import pytest

from ltdd_jax import host_memory

GLIBC = host_memory._mallopt() is not None  # pylint: disable=protected-access


def test_huge_pages_wanted_only_once_and_never_against_the_user():
  if not GLIBC:
    assert not host_memory.huge_pages_wanted({}, "always [madvise] never")
    return
  assert host_memory.huge_pages_wanted({}, "always [madvise] never")
  assert host_memory.huge_pages_wanted({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "[always]")
  assert not host_memory.huge_pages_wanted({}, "always madvise [never]")  # THP off
  assert not host_memory.huge_pages_wanted({}, None)  # no THP at all
  # After the restart (or the user's own choice, 0 included) there is no second one.
  assert not host_memory.huge_pages_wanted({"GLIBC_TUNABLES": host_memory.HUGE_PAGE_TUNABLE}, "[always]")
  assert not host_memory.huge_pages_wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "[always]")


def test_restart_keeps_the_command_line_and_adds_the_tunable(monkeypatch):
  calls = []
  monkeypatch.setattr(host_memory, "huge_pages_wanted", lambda environ, mode: True)
  monkeypatch.setattr(os, "execve", lambda *args: calls.append(args))
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
  monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "launch.pipeline", "--workdir=W"])
  host_memory.restart_with_huge_pages()
  (executable, argv, env), = calls
  assert executable == sys.executable
  assert argv == [sys.executable, "-m", "launch.pipeline", "--workdir=W"]
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + host_memory.HUGE_PAGE_TUNABLE
  monkeypatch.setattr(host_memory, "huge_pages_wanted", lambda environ, mode: False)
  host_memory.restart_with_huge_pages()
  assert len(calls) == 1


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's; other C libraries keep their defaults")
def test_retaining_freed_buffers_applies_on_glibc():
  assert host_memory.retain_freed_buffers()
