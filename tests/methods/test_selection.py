import numpy as np
import pytest

from ltdd_jax.methods import selection


def test_random_selection_and_duplicates():
  labels = np.array([0] * 10 + [1] * 2)
  idx = selection.random_selection(labels, 2, 3, seed=0, allow_duplicates=True)
  np.testing.assert_array_equal(labels[idx], [0, 0, 0, 1, 1, 1])
  assert len(set(idx[:3])) == 3 and set(idx[3:]) == {10, 11}
  np.testing.assert_array_equal(idx, selection.random_selection(labels, 2, 3, 0, True))
  with pytest.raises(ValueError, match="class 1 has only 2 training images"):
    selection.random_selection(labels, 2, 3, seed=0)


def test_herding_starts_at_the_mean():
  features = np.array([[0.0], [10.0], [4.0], [6.0]])
  labels = np.zeros(4, int)
  idx = selection.herding_selection(features, labels, 1, 2)
  assert idx[0] in (2, 3)  # 4 and 6 are closest to the mean 5
  assert set(idx) == {2, 3}  # together they hit the mean exactly
