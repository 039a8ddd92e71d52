"""Host-memory settings for XLA:CPU runs: glibc's malloc kept from handing buffers back and forth.

XLA:CPU allocates a step's temporaries (tens of MiB at CIFAR shapes) with malloc and frees them
when the step ends. glibc returns buffers above its mmap threshold to the kernel at once, so the
next step faults them in again, 4 KiB at a time and zeroed: system time on every step. Two
remedies, both measured by bench/host_memory.py: keep freed buffers up to 32 MiB for reuse
(`retain_freed_buffers`, at run time), and have malloc back its large buffers with transparent
huge pages, so they fault in 2 MiB at a time (`restart_with_huge_pages`: glibc reads that tunable
only at startup). Imports no JAX, so launchers call it first.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import sys

# glibc's mallopt parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MAX_MMAP_THRESHOLD = 32 * 2**20
HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _mallopt():
  """glibc's mallopt, or None where the C library is another (or the platform is not Linux)."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    return ctypes.CDLL(None).mallopt
  except (OSError, AttributeError, TypeError):
    return None


def _thp_mode() -> str | None:
  """The kernel's transparent-huge-page mode line, or None where it cannot be read."""
  try:
    return THP_MODE.read_text()
  except OSError:
    return None


def launched_module() -> str | None:
  """The module this process runs with `python [options] -m MODULE`, or None (a script, pytest,
  an embedding, or `-m` of a wrapper such as pdb running it)."""
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  name = getattr(spec, "name", None)
  argv = list(getattr(sys, "orig_argv", ()))
  after = argv[argv.index("-m") + 1:] if "-m" in argv else []
  return name if name and after[:1] == [name] else None


def with_tunable(tunables: str | None, tunable: str) -> str:
  """GLIBC_TUNABLES with `tunable` appended (`a=1:b=2` form); the value when there was none."""
  return ":".join(filter(None, (tunables, tunable)))


def retain_freed_buffers(trim_threshold: int = 2**30) -> bool:
  """Serves buffers up to 32 MiB from malloc's heap and keeps up to `trim_threshold` bytes of it
  free for reuse. Returns whether it applied: False where the C library is not glibc."""
  mallopt = _mallopt()
  return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD)
                                      and mallopt(M_TRIM_THRESHOLD, trim_threshold))


def huge_pages_wanted(environ, thp_mode: str | None, glibc: bool) -> bool:
  """Whether a process with this environment should restart with the huge-page tunable: glibc,
  a kernel whose transparent huge pages are not off (`thp_mode`, the text of THP_MODE, None if
  absent), and no `glibc.malloc.hugetlb` setting of the user's (which also ends the restart)."""
  if "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", "") or not glibc:
    return False
  return thp_mode is not None and "[never]" not in thp_mode


def restart_with_huge_pages() -> None:
  """Re-executes this process (same PID, same command line) with glibc's transparent-huge-page
  tunable added to GLIBC_TUNABLES, once; a no-op where `huge_pages_wanted` says no. Set
  GLIBC_TUNABLES=glibc.malloc.hugetlb=0 to opt out (of this; `retain_freed_buffers` still
  applies)."""
  if not huge_pages_wanted(os.environ, _thp_mode(), _mallopt() is not None):
    return
  tunables = with_tunable(os.environ.get("GLIBC_TUNABLES"), HUGE_PAGE_TUNABLE)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
            {**os.environ, "GLIBC_TUNABLES": tunables})
