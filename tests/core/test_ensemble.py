import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ltdd_jax import errors, models, parallel, seeds
from ltdd_jax.core import ensemble, training


def test_map_and_vmap_ensembles_agree():
  """lax.map (CPU's pick) and vmap run the same per-network function: same values, same shapes."""
  def fn(w, x, scale):
    return jnp.tanh(x @ w["a"]) * scale

  w = {"a": jax.random.normal(jax.random.key(0), (3, 4, 5))}
  x = jax.random.normal(jax.random.key(1), (7, 4))
  out = {impl: ensemble.over_ensemble(fn, (0, None, None), impl)(w, x, 2.0)
         for impl in ("vmap", "map")}
  chex.assert_shape(out["map"], (3, 7, 5))
  np.testing.assert_allclose(out["map"], out["vmap"], rtol=1e-5, atol=1e-6)


def test_unknown_ensemble_impl_is_named():
  with pytest.raises(ValueError, match="model.ensemble_impl"):
    ensemble.resolve_ensemble_impl("pmap")
  assert ensemble.resolve_ensemble_impl("auto") == ("map" if jax.default_backend() == "cpu"
                                                    else "vmap")


def test_prediction_compiles_once_per_model(monkeypatch):
  """Evaluations of one architecture reuse one compiled forward pass: building the same model
  again (as every evaluation does) does not trace it again."""
  spec = models.ModelSpec(depth=1, width=4)
  images = np.random.default_rng(0).normal(size=(6, 8, 8, 1)).astype(np.float32)
  model = models.make_classifier(spec, 3)
  params = ensemble.init_params(model, jax.random.key(0), 2, (8, 8, 1))
  inference = models.for_inference(model)
  # Batches of 4 and of the last 2 images: two shapes, two traces in all.
  counted = chex.assert_max_traces(lambda p, x: inference.apply({"params": p}, x), n=2)
  monkeypatch.setattr(ensemble, "make_apply", lambda _: counted)
  ensemble.predict_fn.cache_clear()
  first = ensemble.logits(model, params, images, 4, "map")
  again = ensemble.logits(models.make_classifier(spec, 3), params, images, 4, "map")
  np.testing.assert_array_equal(first, again)
  chex.assert_shape(first, (2, 6, 3))
  ensemble.predict_fn.cache_clear()


def _recipe(num_models=2, epochs=3, lr=0.1, decay_epoch=None):
  model = models.make_classifier(models.ModelSpec(depth=1, width=4), 3)
  spec = training.TrainSpec(batch_size=8, steps_per_epoch=2, momentum=0.9, weight_decay=5e-4,
                            num_classes=3)
  return ensemble.Recipe(model, spec, lr, epochs, num_models, init_seed=0,
                         keys=seeds.EpochKeys(7), decay_epoch=decay_epoch)


def _data(n=16):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, n).astype(np.int32)
  return {"images": rng.normal(size=(n, 8, 8, 1)).astype(np.float32), "targets": labels,
          "labels": labels}


def _never(done, losses):
  raise AssertionError(f"diverged at {done}: {losses}")


def test_epoch_program_is_traced_once_and_networks_train_as_alone(monkeypatch):
  """Every epoch of a training runs one compiled program (one trace of the kernel), and the
  ensemble's networks are exactly what each would be trained alone with its own key."""
  recipe = _recipe(epochs=3)
  data = _data()
  counted = chex.assert_max_traces(training.train_epoch, n=1)
  monkeypatch.setattr(training, "train_epoch", counted)
  ensemble.epoch_program.cache_clear()
  states = ensemble.init_states(recipe, (8, 8, 1))
  trained = ensemble.train(recipe, states, data, parallel.make_mesh(1), diverged=_never)
  chex.assert_shape(jax.tree.leaves(trained["params"])[0], (2,) + jax.tree.leaves(
      states["params"])[0].shape[1:])
  ensemble.epoch_program.cache_clear()
  monkeypatch.undo()
  # Network 1 alone: the same kernel, its own key each epoch.
  one = jax.tree.map(lambda x: x[1], states)
  apply_fn = ensemble.make_apply(recipe.model)
  kernel = jax.jit(lambda s, k, lr: training.train_epoch(apply_fn, recipe.train, s, k, lr, data))
  for epoch in range(recipe.epochs):
    one, _ = kernel(one, recipe.keys(epoch, recipe.num_models)[1], jnp.float32(recipe.lr_at(epoch)))
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[1], trained), one, rtol=1e-5, atol=1e-6)


def test_lr_steps_down_at_the_decay_epoch_and_keys_fold_the_epoch():
  recipe = _recipe(epochs=4, lr=0.2, decay_epoch=2)
  assert [recipe.lr_at(e) for e in range(4)] == [0.2, 0.2, 0.2 * 0.1, 0.2 * 0.1]
  keys = seeds.EpochKeys(3, first_fold=1)
  expected = jax.random.split(jax.random.fold_in(jax.random.key(3), 1), 2)
  np.testing.assert_array_equal(jax.random.key_data(keys(0, 2)), jax.random.key_data(expected))


def test_warmup_then_cosine_per_epoch():
  recipe = dataclasses.replace(_recipe(epochs=10, lr=0.1), warmup_epochs=2, cosine=True)
  lrs = [recipe.lr_at(e) for e in range(10)]
  np.testing.assert_allclose(lrs[:2], [0.05, 0.1])  # linear warm-up to the lr
  span = 10 - 2 + 1
  np.testing.assert_allclose(lrs[2:], [0.05 * (1 + np.cos(np.pi * (e - 1) / span))
                                       for e in range(2, 10)])
  assert all(a > b for a, b in zip(lrs[1:], lrs[2:])) and 0 < lrs[-1] < 0.01  # falls towards 0


class _ListStore:
  """A store that keeps every save in memory, for the resume test."""

  def __init__(self, saved=None):
    self.saved = dict(saved or {})

  def restore(self, states):
    if not self.saved:
      return 0, states
    step = max(self.saved)
    return step, self.saved[step]

  def wants(self, done, last):
    return True

  def save(self, done, states):
    self.saved[done] = jax.tree.map(np.array, states)

  def finish(self, states):
    pass


def test_training_resumed_from_any_save_is_bitwise_uninterrupted():
  recipe = _recipe(epochs=4)
  data = _data()
  mesh = parallel.make_mesh(1)
  full = _ListStore()
  uninterrupted = ensemble.train(recipe, ensemble.init_states(recipe, (8, 8, 1)), data, mesh,
                                 store=full, diverged=_never)
  resumed = ensemble.train(recipe, ensemble.init_states(recipe, (8, 8, 1)), data, mesh,
                           store=_ListStore({2: full.saved[2]}), diverged=_never)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, resumed),
                              jax.tree.map(np.asarray, uninterrupted))


def test_a_non_finite_loss_raises_the_given_error_before_saving():
  recipe = _recipe(epochs=3, lr=1e30)
  store = _ListStore()

  def diverged(done, losses):
    return errors.DivergedError(f"epoch {done}")

  with pytest.raises(errors.DivergedError, match="epoch"):
    ensemble.train(recipe, ensemble.init_states(recipe, (8, 8, 1)), _data(), parallel.make_mesh(1),
                   store=store, diverged=diverged)
  assert all(ensemble.all_finite(s) for s in store.saved.values())


def test_half_cosine_runs_from_lr_to_half_of_it():
  spec = training.TrainSpec(batch_size=1, steps_per_epoch=1, momentum=0, weight_decay=0,
                            num_classes=2)
  recipe = ensemble.Recipe(None, spec, 0.001, 300, 1, 0, seeds.EpochKeys(0), half_cosine=True)
  assert recipe.lr_at(0) == 0.001
  np.testing.assert_allclose(recipe.lr_at(150), 0.001 * 0.5 * (1 + np.cos(np.pi / 4)))
  np.testing.assert_allclose(recipe.lr_at(299), 0.0005, rtol=0.01)
  with pytest.raises(errors.InputError, match="whole schedule"):
    ensemble.Recipe(None, spec, 0.001, 300, 1, 0, seeds.EpochKeys(0), half_cosine=True,
                    decay_epoch=150)
