import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from ltdd_jax import models, training


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


def test_prediction_compiles_once_per_model(monkeypatch):
  """Evaluations of one architecture reuse one compiled forward pass: building the same model
  again (as every evaluation does) does not trace it again."""
  cfg = common.base_config().model
  cfg.depth, cfg.width = 1, 4
  images = np.random.default_rng(0).normal(size=(6, 8, 8, 1)).astype(np.float32)
  model = models.make_classifier(cfg, 3)
  params = training.init_ensemble(model, jax.random.key(0), 2, (8, 8, 1))
  inference = models.for_inference(model)
  # Batches of 4 and of the last 2 images: two shapes, two traces in all.
  counted = chex.assert_max_traces(lambda p, x: inference.apply({"params": p}, x), n=2)
  monkeypatch.setattr(training, "make_apply", lambda _: counted)
  training.predict_fn.cache_clear()
  first = training.model_logits(model, params, images, 4, "map")
  again = training.model_logits(models.make_classifier(cfg, 3), params, images, 4, "map")
  np.testing.assert_array_equal(first, again)
  chex.assert_shape(first, (2, 6, 3))
  training.predict_fn.cache_clear()
