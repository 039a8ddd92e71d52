"""One process per folder: an exclusive `fcntl.flock` on `<folder>/.lock`.

A run locks its workdir for as long as it lives (`pipeline.setup`), and an expert set's folder
while it trains it, so two processes never write one folder. The OS releases a process's locks
when it dies (even by kill -9), so a lock is never stale; the file names its holder (PID, host,
start time, command) for the message a second process prints. The benchmark grid and the tuner
lock each cell's folder the same way (`each_free`): two of them on one folder split the cells.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import socket
import sys
from typing import Callable, Iterable, Iterator

from ltdd_jax import errors

LOCK_FILE = ".lock"
_held: dict[str, int] = {}  # real path of a locked folder -> the lock file's descriptor


class LockedError(errors.WorkdirError):
  """Another process holds the folder's lock."""


def _holder(path: pathlib.Path) -> dict:
  try:
    return json.loads(path.read_text() or "{}")
  except (OSError, ValueError):
    return {}


def describe(holder: dict) -> str:
  """`PID 123 on host h (since ..., `command`)` from a lock file's record."""
  if not holder:
    return "another process (its record is not readable)"
  return (f"PID {holder.get('pid')} on {holder.get('host')} (since {holder.get('started')}: "
          f"{holder.get('command')})")


def _try_lock(directory: pathlib.Path, wait: bool) -> int | None:
  """The locked descriptor of `directory`'s lock file, or None when another process holds it."""
  directory.mkdir(parents=True, exist_ok=True)
  fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
  except BlockingIOError:
    os.close(fd)
    return None
  record = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:300]}
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps(record).encode(), 0)
  return fd


def acquire(directory, what: str = "workdir", wait: bool = False) -> None:
  """Locks `directory` for this process (a no-op when it already holds it).

  Raises:
    LockedError: another process holds it (unless `wait`: then this blocks until it is free,
      saying whom it waits for).
  """
  directory = pathlib.Path(os.path.expanduser(os.fspath(directory)))
  key = os.path.realpath(directory)
  if key in _held:
    return
  try:
    fd = _try_lock(directory, wait=False)
  except OSError as e:  # Not a folder, or not writable: `resume.prepare_workdir` says which.
    if what == "workdir":
      return
    raise errors.WorkdirError(f"{directory} ({what}) cannot be locked ({e}).") from e
  if fd is None and wait:
    print(f"[lock] {directory} ({what}) is in use by {describe(_holder(directory / LOCK_FILE))}; "
          "waiting for it to finish.", file=sys.stderr, flush=True)
    fd = _try_lock(directory, wait=True)
  if fd is None:
    holder = _holder(directory / LOCK_FILE)
    pid = holder.get("pid", "PID")
    raise LockedError(
        f"{directory} ({what}) is in use by {describe(holder)}. Wait for it to finish (e.g. "
        f"`tail --pid={pid} -f /dev/null`, on its host) or stop it, then rerun; a process that "
        "has died holds no lock. Use another --workdir to run both at once.")
  _held[key] = fd


def release(directory) -> None:
  """Releases this process's lock on `directory` (a no-op when it holds none)."""
  fd = _held.pop(os.path.realpath(pathlib.Path(directory)), None)
  if fd is not None:
    os.close(fd)  # Closing the descriptor releases the flock.


@contextlib.contextmanager
def held(directory, what: str, wait: bool = True):
  """Holds `directory`'s lock inside the block (waiting for it by default); a lock this process
  already held stays held after it."""
  key = os.path.realpath(pathlib.Path(directory))
  mine = key in _held
  acquire(directory, what, wait)
  try:
    yield
  finally:
    if not mine:
      release(directory)


def each_free(folders: Iterable[pathlib.Path], done: Callable[[pathlib.Path], bool],
              what: str = "cell") -> Iterator[pathlib.Path]:
  """Yields every folder not `done`, locked while the caller works on it (released when the
  caller asks for the next one). Folders another process holds are skipped and come back once
  it lets go (waiting for them when nothing else is left), so two processes sharing the folders
  split them and never work on one at once. A folder is yielded at most once."""
  pending = [pathlib.Path(f) for f in folders]
  while pending:
    busy = []
    for folder in pending:
      if done(folder):
        continue
      try:
        acquire(folder, what)
      except LockedError:
        busy.append(folder)
        continue
      try:
        if not done(folder):  # Another process may have finished it since it was listed.
          yield folder
      finally:
        release(folder)
    if busy:
      print(f"[lock] {len(busy)} {what}(s) in use by another process, e.g. {busy[0].name}; "
            "waiting for them.", file=sys.stderr, flush=True)
      with held(busy[0], what, wait=True):
        pass
    pending = busy
