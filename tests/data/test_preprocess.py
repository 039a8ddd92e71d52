import numpy as np

from ltdd_jax.data import preprocess


def test_zca_whitens_and_inverts():
  rng = np.random.default_rng(0)
  mixing = rng.normal(size=(48, 48))
  x = (rng.normal(size=(4000, 48)) @ mixing).reshape(4000, 4, 4, 3) * 0.05 + 0.5
  pre = preprocess.fit_preprocessor(x, normalize=True, zca=True, zca_eps=1e-6)
  z = pre.apply(x).reshape(len(x), -1)
  cov = np.cov(z, rowvar=False)
  np.testing.assert_allclose(cov, np.eye(48), atol=0.02)
  np.testing.assert_allclose(pre.invert(pre.apply(x)), x, atol=1e-4)


def test_zca_without_normalisation_inverts():
  x = np.random.default_rng(1).uniform(size=(200, 4, 4, 3))
  pre = preprocess.fit_preprocessor(x, normalize=False, zca=True, zca_eps=0.1)
  np.testing.assert_allclose(pre.invert(pre.apply(x)), x, atol=1e-4)


def test_normalisation_only():
  x = np.random.default_rng(2).uniform(size=(500, 4, 4, 3))
  pre = preprocess.fit_preprocessor(x, normalize=True, zca=False, zca_eps=0.1)
  z = pre.apply(x)
  np.testing.assert_allclose(z.mean(axis=(0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(z.std(axis=(0, 1, 2)), 1, atol=1e-4)
  np.testing.assert_allclose(pre.invert(z), x, atol=1e-5)
