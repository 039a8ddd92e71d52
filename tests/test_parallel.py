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
