import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ltdd_jax import parallel


def test_sharded_equals_single_device():
  assert jax.device_count() == 4, "conftest sets 4 fake CPU devices"
  x = np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32)
  w = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
  f = jax.jit(lambda x, w: jnp.mean(jnp.tanh(x @ w), axis=0))
  mesh4 = parallel.make_mesh(4)
  xs = parallel.shard_leading(x, mesh4)
  assert len(xs.sharding.device_set) == 4
  sharded = parallel.gather(f(xs, parallel.replicate(w, mesh4)))
  single = parallel.gather(f(*parallel.replicate((x, w), parallel.make_mesh(1))))
  np.testing.assert_allclose(sharded, single, rtol=1e-6, atol=1e-6)


def test_uneven_leading_axis_is_replicated():
  mesh = parallel.make_mesh(4)
  y = parallel.shard_leading(np.ones((3, 2)), mesh)
  assert y.sharding.is_fully_replicated


def test_too_many_devices_fails():
  with pytest.raises(ValueError, match="only 4 devices"):
    parallel.make_mesh(64)


def test_compilation_cache_stores_programs(tmp_path):
  """A fresh process pointed at a cache folder leaves compiled programs there (the benchmark grid
  relies on this to skip recompiling identical cells)."""
  script = (
      "import jax, jax.numpy as jnp\n"
      "from ltdd_jax import parallel\n"
      f"parallel.use_compilation_cache({str(tmp_path / 'xla')!r}, min_compile_seconds=0.0)\n"
      "jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()\n")
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE")
         and k != "JAX_COMPILATION_CACHE_DIR"}  # not the test run's own cache
  subprocess.run([sys.executable, "-c", script], check=True, env={**env, "XLA_FLAGS": ""})
  assert any((tmp_path / "xla").iterdir())
