"""Ctrl-C and SIGTERM stop a run at its next safe point, never in the middle of a save.

`install` (the launchers call it) turns SIGINT and SIGTERM into a request. Inside a training loop
(`safe_points`), the loop calls `check` after each step it could resume from: the request then
saves what the loop holds (its `save`) and raises `Interrupted` naming the stage and step to
resume from. Outside a loop (loading data, compiling) the request raises `Interrupted` at once:
nothing unsaved is lost there. A second signal while a request waits stops the process at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading

from ltdd_jax import errors

_state = {"signal": None, "depth": 0}


class Interrupted(errors.Error):
  """The run was stopped by a signal; rerunning the same command resumes it."""

  def __init__(self, signum: int, where: str = ""):
    self.signum = signum
    self.exit_code = 128 + signum
    resume = f"from {where}" if where else "where it stopped"
    super().__init__(f"interrupted ({signal.Signals(signum).name}); rerun the same command to "
                     f"resume {resume}.")


def _handler(signum, frame):
  del frame
  if _state["signal"] is not None or _state["depth"] == 0:
    raise Interrupted(signum)
  _state["signal"] = signum


def install() -> None:
  """Makes SIGINT and SIGTERM requests to stop at the next safe point (main thread only)."""
  if threading.current_thread() is not threading.main_thread():
    return
  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, _handler)


@contextlib.contextmanager
def safe_points():
  """Inside: a signal waits for the loop's next `check` instead of stopping it mid-step."""
  _state["depth"] += 1
  try:
    yield
  finally:
    _state["depth"] -= 1
  if _state["depth"] == 0 and _state["signal"] is not None:  # The loop ended with a request.
    signum, _state["signal"] = _state["signal"], None
    raise Interrupted(signum)


def requested() -> bool:
  """Whether a signal asked the run to stop."""
  return _state["signal"] is not None


def check(where: str, save=None) -> None:
  """At a safe point: if a signal asked to stop, `save()` (what the loop holds) and raise
  `Interrupted` naming `where` (e.g. 'distillation iteration 120')."""
  if _state["signal"] is None:
    return
  if save is not None:
    save()
  signum, _state["signal"] = _state["signal"], None
  raise Interrupted(signum, where)
