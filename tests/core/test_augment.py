import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ltdd_jax.core import augment


def _cfg(strategy, mode="single", siamese=False):
  return augment.DSASpec(strategy=strategy, mode=mode, siamese=siamese)


@pytest.mark.parametrize("family", augment.FAMILIES)
def test_each_family_shape_determinism_and_gradient(family):
  cfg = _cfg(family)
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 2))
  key = jax.random.key(1)
  y = augment.augment(key, x, cfg)
  chex.assert_shape(y, x.shape)
  np.testing.assert_array_equal(y, augment.augment(key, x, cfg))
  grad = jax.grad(lambda im: jnp.sum(augment.augment(key, im, cfg) ** 2))(x)
  assert np.isfinite(np.asarray(grad)).all()


@pytest.mark.parametrize("family", ["color", "scale", "rotate", "crop"])
def test_gradient_matches_finite_differences(family):
  cfg = _cfg(family)
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 1), dtype=jnp.float32)
  w = jax.random.normal(jax.random.key(2), (2, 6, 6, 1))
  key = jax.random.key(5)
  f = lambda im: jnp.sum(augment.augment(key, im, cfg) * w)
  grad = jax.grad(f)(x)
  direction = jax.random.normal(jax.random.key(3), x.shape)
  eps = 1e-2
  numeric = (f(x + eps * direction) - f(x - eps * direction)) / (2 * eps)
  np.testing.assert_allclose(jnp.vdot(grad, direction), numeric, rtol=2e-3, atol=2e-3)


def test_siamese_shares_parameters():
  cfg = _cfg("color_crop_flip_scale_rotate", mode="all", siamese=True)
  img = jax.random.normal(jax.random.key(0), (1, 8, 8, 3))
  out = augment.augment(jax.random.key(4), jnp.repeat(img, 4, axis=0), cfg)
  for i in range(1, 4):
    np.testing.assert_allclose(out[i], out[0], atol=1e-6)
  independent = augment.augment(jax.random.key(4), jnp.repeat(img, 4, axis=0),
                                _cfg("color_crop_flip_scale_rotate", mode="all", siamese=False))
  assert not np.allclose(independent[1], independent[0])


def test_no_family_is_identity_and_jits():
  cfg = _cfg("")
  x = jnp.ones((2, 4, 4, 3))
  assert augment.augment(jax.random.key(0), x, cfg) is x
  on = _cfg("color_crop_cutout_flip_scale_rotate")
  y = jax.jit(lambda k, im: augment.augment(k, im, on))(jax.random.key(0), x)
  chex.assert_shape(y, x.shape)


def test_unknown_family_fails():
  with pytest.raises(ValueError, match="Unknown DSA family 'blur'"):
    augment.parse_strategy("color_blur")


def test_cutmix_box_covers_at_most_one_minus_lam():
  box = augment.cutmix_box(jax.random.key(0), jnp.float32(0.75), 32, 32)
  assert 0 < float(box.mean()) <= 0.25 + 1e-6  # at most (1 - lam) of the image, less at a border


def test_cutmix_pastes_the_partner_in_one_box_and_reports_the_kept_share():
  images = jnp.arange(6, dtype=jnp.float32)[:, None, None, None] * jnp.ones((6, 16, 16, 1))
  mixed, partner, kept = augment.cutmix(jax.random.key(3), images, 1.0)
  chex.assert_shape(mixed, images.shape)
  assert sorted(np.asarray(partner).tolist()) == list(range(6))  # a permutation of the batch
  for i in range(6):  # every pixel is the image's own or its partner's
    own = np.isclose(mixed[i], i)
    assert (own | np.isclose(mixed[i], int(partner[i]))).all()
  moved = [i for i in range(6) if int(partner[i]) != i]
  share = np.isclose(mixed[moved[0]], moved[0]).mean()
  np.testing.assert_allclose(float(kept), share, rtol=1e-6)
  again, _, _ = augment.cutmix(jax.random.key(3), images, 1.0)
  np.testing.assert_array_equal(again, mixed)
