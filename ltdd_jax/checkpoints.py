"""Orbax checkpoints behind three calls, with errors that say what to do.

Saves are synchronous (the states here are small and a resumed run must find what was saved), and a
checkpoint that cannot be read names its folder and the two ways out (delete it, or start afresh).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ltdd_jax import errors


class CheckpointError(errors.Error, RuntimeError):
  """A checkpoint exists but cannot be restored."""


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)


class Checkpoints:
  """Numbered checkpoints of one pytree under `directory` (keeps the last `max_to_keep`; None: all)."""

  def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 2):
    self.directory = os.path.abspath(os.fspath(directory))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, tree: Any) -> None:
    tree = jax.tree.map(np.asarray, tree)
    self._manager.save(step, args=ocp.args.StandardSave(tree), force=True)
    self._manager.wait_until_finished()

  def restore(self, step: int, like: Any) -> Any:
    """Restores `step` into the structure (shapes, dtypes) of `like`; numpy leaves. Orbax hands
    back a saved array whatever shape it is asked for, so other shapes are an error here."""
    advice = ("It is corrupt or from a different config: delete that step folder to resume from "
              "an earlier one, or use a fresh --workdir.")
    try:
      out = self._manager.restore(step, args=ocp.args.StandardRestore(_abstract(like)))
    except Exception as e:  # orbax raises many types for truncated/corrupt/mismatched files.
      raise CheckpointError(f"Checkpoint {self.directory}/{step} cannot be restored "
                            f"({type(e).__name__}: {e}). {advice}") from e
    out = jax.tree.map(np.asarray, out)
    if jax.tree.map(np.shape, out) != jax.tree.map(np.shape, like):
      raise CheckpointError(f"Checkpoint {self.directory}/{step} holds arrays of other shapes "
                            f"than this run's. {advice}")
    return out

  def restore_any(self, step: int) -> Any:
    """Restores `step` with the structure stored in the checkpoint itself (numpy leaves)."""
    try:
      out = self._manager.restore(step, args=ocp.args.StandardRestore())
    except Exception as e:
      raise CheckpointError(f"Checkpoint {self.directory}/{step} cannot be read ({e}); delete it.") from e
    return jax.tree.map(np.asarray, out)

  def delete(self, step: int) -> None:
    self._manager.delete(step)

  def close(self) -> None:
    self._manager.close()


def save_tree(path: str | os.PathLike, tree: Any) -> None:
  """Writes one pytree to its own folder (overwriting)."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(os.fspath(path)), jax.tree.map(np.asarray, tree), force=True)


def load_tree(path: str | os.PathLike) -> Any:
  """Reads a pytree written by `save_tree` (numpy leaves)."""
  path = os.path.abspath(os.fspath(path))
  try:
    with ocp.StandardCheckpointer() as ckptr:
      out = ckptr.restore(path)
  except Exception as e:
    raise CheckpointError(f"Cannot read {path} ({type(e).__name__}: {e}). Delete it and re-run the "
                          "stage that writes it.") from e
  return jax.tree.map(np.asarray, out)
