"""Flags every launcher shares (--config, --workdir) and how a launcher ends: one line, no traceback,
for every error raised on purpose, a bad command line, and Ctrl-C / SIGTERM."""

import difflib
import importlib.util
import pathlib
import sys

from ltdd_jax import host_memory

if (host_memory.launched_module() or "").startswith("launch."):
  host_memory.restart_with_huge_pages()  # before JAX is imported: a launcher run, not a test

from absl import app, flags  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

from ltdd_jax import errors, interrupts  # pylint: disable=g-import-not-at-top
from ltdd_jax.run import locks  # pylint: disable=g-import-not-at-top

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/digits_lt.py or configs/cifar10_lt.py:profile=cpu. "
    "Override any key with --config.section.key=value.", lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints and outputs (resumable).")
flags.mark_flags_as_required(["config", "workdir"])


def quiet_libraries() -> None:
  """Keeps absl INFO lines of libraries (orbax logs every save) off the console; progress lines and
  results are printed by ltdd_jax itself. --verbosity=0 on the command line brings them back."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def _root(error: BaseException) -> BaseException:
  """The innermost exception of a chain (what actually went wrong)."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  return error


def _config_argument(argv) -> str | None:
  """The value of --config=... on the command line."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.partition("=")[2]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _config_keys(config_argument: str) -> list[str] | None:
  """Every key (`section.key`) of the config file's config, or None if it cannot be built."""
  path, _, arg = config_argument.partition(":")
  try:
    spec = importlib.util.spec_from_file_location("_launch_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg or None) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except
    return None
  keys = []

  def walk(node, prefix):
    for key, value in node.items():
      if hasattr(value, "items"):
        walk(value, f"{prefix}{key}.")
      else:
        keys.append(prefix + key)

  walk(config, "")
  return keys


def command_line_error(error: BaseException, argv) -> str:
  """One line saying what is wrong with the command line and how to fix it."""
  root = _root(error)
  config_argument = _config_argument(argv) or ""
  path = config_argument.partition(":")[0]
  if path and not pathlib.Path(path).is_file():
    configs = sorted(p.name for p in pathlib.Path("configs").glob("*.py") if p.name[0] != "_")
    return (f"--config={config_argument}: no config file {path!r}"
            + (f"; the configs here: {', '.join(configs)}." if configs else "."))
  overrides = [a[2:].partition("=")[0][len("config."):] for a in argv if a.startswith("--config.")]
  keys = _config_keys(config_argument) if overrides else None
  if keys is not None:
    for key in overrides:
      if key not in keys:
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else "; `configs/common.py` lists every key."
        return f"unknown config key {key!r} (--config.{key}=...){hint}"
  message = str(root).strip().splitlines()
  text = message[0] if message else type(root).__name__
  flag_line = str(error).strip().splitlines()
  if isinstance(error, flags.IllegalFlagValueError) and flag_line and root is not error:
    text = f"{flag_line[0].partition(':')[0]}: {text}"
  return text


def parse_flags(argv):
  """Parses the command line; a bad one (unknown flag or config key, missing config file, bad
  config argument or value) ends the launcher with one line and exit status 2."""
  try:
    remaining = flags.FLAGS(argv)
    CONFIG.value.keys()  # The file loads lazily: load it now, while errors are still flag errors.
  except Exception as e:  # pylint: disable=broad-except
    print(f"error: {command_line_error(e, argv)}", file=sys.stderr)
    sys.exit(2)
  return remaining


def run(main, lock_workdir: bool = True) -> None:
  """`app.run(main)`, with the errors ltdd_jax raises on purpose (bad config values, files, sets,
  workdirs; a mismatched resume; divergence) printed as one line and exit status 1, a bad command
  line as one line and status 2, and SIGINT / SIGTERM stopping at the next safe point with one line
  and status 130 / 143. Any other exception is a bug and keeps its traceback.

  `lock_workdir`: lock --workdir before `main` runs (and imports JAX), so that a second process
  on it fails at once; the benchmark grid and the tuner lock each cell instead."""

  def guarded(argv):
    interrupts.install()
    host_memory.retain_freed_buffers()
    try:
      if lock_workdir:
        locks.acquire(WORKDIR.value)
      return main(argv)
    except interrupts.Interrupted as e:
      print(f"{e}", file=sys.stderr)
      sys.exit(e.exit_code)
    except KeyboardInterrupt:
      print("interrupted; rerun the same command to resume where it stopped.", file=sys.stderr)
      sys.exit(130)
    except errors.Error as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)

  app.run(guarded, flags_parser=parse_flags)
