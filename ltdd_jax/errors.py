"""Errors ltdd_jax raises on purpose: each message names the problem and the fix.

Launchers print these as one line (`launch/_common.run`); anything else is a bug and keeps its
traceback. Each class also derives from the builtin a caller would expect (ValueError for a bad
value, FileNotFoundError for a missing file), so `except ValueError` keeps working.
"""


class Error(Exception):
  """Base of every error raised on purpose."""


class InputError(Error, ValueError):
  """A bad config value, file or set: the message says which and how to fix it."""


class MissingError(Error, FileNotFoundError):
  """Something a stage needs is not there (a file, an earlier stage's output)."""


class WorkdirError(Error, OSError):
  """The workdir cannot be used (a file, read-only, full disk)."""


class ResumeMismatchError(InputError):
  """A workdir holds a stage's outputs made with other config values than the current ones."""


class DivergedError(Error, FloatingPointError):
  """Training or distillation stopped being finite (distillation keeps its last good checkpoint)."""
