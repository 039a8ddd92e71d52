"""One device mesh for everything: data parallel over the `data` axis.

Arrays are placed with `NamedSharding`; jit-compiled functions then run SPMD over the mesh and XLA
inserts the collectives. Multi-host runs call `initialize_distributed()` first, then build the same
mesh over all global devices.
"""

from __future__ import annotations

import os
import pathlib

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ltdd_jax import errors

AXIS = "data"


def initialize_distributed(enabled: bool) -> None:
  """Calls `jax.distributed.initialize()` (multi-host) when enabled; a no-op otherwise."""
  if enabled:
    jax.distributed.initialize()


def resolve_for_backend(key: str, impl: str, choices: tuple[str, ...], fastest: dict[str, str],
                        default: str) -> str:
  """Validates `impl` (one of `choices`) and maps `auto` to the measured-fastest choice for the
  default backend (`fastest`, else `default`). `key` names the config entry in the error."""
  if impl not in choices:
    raise errors.InputError(f"Unknown {key} {impl!r}; accepted: {choices}.")
  if impl == "auto":
    return fastest.get(jax.default_backend(), default)
  return impl


def use_compilation_cache(directory: str, min_compile_seconds: float = 1.0) -> None:
  """Points JAX's persistent compilation cache at `directory` ('' leaves it off).

  Programs that compile faster than `min_compile_seconds` are not stored. Runs that repeat the
  same programs (every cell of a benchmark grid, a resumed run) then load compiled executables
  from disk instead of compiling them again. A cache the environment names
  (JAX_COMPILATION_CACHE_DIR) is left as it is."""
  if not directory or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  directory = str(pathlib.Path(directory).expanduser())
  if jax.config.jax_compilation_cache_dir != directory:
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)


def make_mesh(num_devices: int = -1) -> Mesh:
  """A 1-D mesh with axis `data` over the first `num_devices` devices (-1: all)."""
  devices = jax.devices()
  if num_devices > len(devices):
    raise errors.InputError(f"mesh.num_devices={num_devices} but only {len(devices)} devices are visible; "
                     "use -1 for all of them.")
  if num_devices > 0:
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over `data`."""
  return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def shard_leading(tree, mesh: Mesh):
  """Places every leaf with its leading axis split over `data` (replicated where it does not divide).

  Args:
    tree: pytree of arrays [B, ...].
    mesh: the mesh.

  Returns:
    The same pytree as global jax.Arrays.
  """
  size = mesh.shape[AXIS]

  def put(x):
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    ok = x.ndim > 0 and x.shape[0] % size == 0
    return jax.device_put(x, data_sharding(mesh) if ok else replicated(mesh))

  return jax.tree.map(put, tree)


def replicate(tree, mesh: Mesh):
  """Places every leaf replicated on the mesh."""
  return jax.tree.map(lambda x: jax.device_put(x, replicated(mesh)), tree)


def constrain_leading(x: jax.Array, mesh: Mesh | None) -> jax.Array:
  """Inside jit: asks XLA to keep x [B, ...] split over `data` (no-op without a mesh or if B does not
  divide)."""
  if mesh is None or mesh.shape[AXIS] == 1 or x.shape[0] % mesh.shape[AXIS]:
    return x
  return jax.lax.with_sharding_constraint(x, data_sharding(mesh))


def gather(tree):
  """Brings a (possibly sharded) pytree back to host numpy arrays."""
  return jax.tree.map(np.asarray, tree)
