import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ltdd_jax import training


def test_map_and_vmap_ensembles_agree():
  """lax.map (CPU's pick) and vmap run the same per-network function: same values, same shapes."""
  def fn(w, x, scale):
    return jnp.tanh(x @ w) * scale

  w = jax.random.normal(jax.random.key(0), (3, 4, 5))
  x = jax.random.normal(jax.random.key(1), (7, 4))
  out = {impl: training.over_ensemble(fn, (0, None, None), impl)(w, x, 2.0)
         for impl in ("vmap", "map")}
  chex.assert_shape(out["map"], (3, 7, 5))
  np.testing.assert_allclose(out["map"], out["vmap"], rtol=1e-5, atol=1e-6)


def test_unknown_ensemble_impl_is_named():
  with pytest.raises(ValueError, match="model.ensemble_impl"):
    training.resolve_ensemble_impl("pmap")
  assert training.resolve_ensemble_impl("auto") == ("map" if jax.default_backend() == "cpu"
                                                    else "vmap")
