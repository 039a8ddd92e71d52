import numpy as np
import pytest

from ltdd_jax.data import longtail


@pytest.mark.parametrize("num_classes,imbalance", [(10, 10), (10, 50), (10, 100), (10, 200),
                                                   (100, 100)])
def test_counts_follow_formula(num_classes, imbalance):
  counts = longtail.longtail_counts(5000 if num_classes == 10 else 500, num_classes, imbalance)
  n_max = counts[0]
  expected = [int(np.floor(n_max * imbalance**(-c / (num_classes - 1)))) for c in range(num_classes)]
  np.testing.assert_array_equal(counts, expected)
  assert counts[-1] == int(n_max / imbalance)
  assert np.all(np.diff(counts) <= 0)


def test_cifar10_if100_published_counts():
  counts = longtail.longtail_counts(5000, 10, 100)
  np.testing.assert_array_equal(counts, [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50])
  assert counts.sum() == 12406


def test_step_profile():
  np.testing.assert_array_equal(longtail.longtail_counts(100, 4, 10, "step"), [100, 100, 10, 10])


@pytest.mark.parametrize("bad", [0.5, 0.0, -3])
def test_imbalance_below_one_fails(bad):
  with pytest.raises(ValueError, match="imbalance_factor must be >= 1"):
    longtail.longtail_counts(100, 10, bad)


def test_unknown_profile_fails():
  with pytest.raises(ValueError, match="accepted"):
    longtail.longtail_counts(100, 10, 10, "linear")


def _pool(per_class=600, num_classes=10):
  return np.repeat(np.arange(num_classes), per_class)[np.random.default_rng(0).permutation(
      per_class * num_classes)]


def test_split_is_deterministic_and_disjoint():
  labels = _pool()
  a = longtail.split_pool(labels, 10, 100, validation_per_class=50, holdout_per_class=100, seed=3)
  b = longtail.split_pool(labels, 10, 100, validation_per_class=50, holdout_per_class=100, seed=3)
  np.testing.assert_array_equal(a.train, b.train)
  np.testing.assert_array_equal(a.validation, b.validation)
  assert not set(a.train) & set(a.validation)
  assert not set(a.train) & set(a.holdout)
  assert not set(a.validation) & set(a.holdout)
  np.testing.assert_array_equal(np.bincount(labels[a.validation], minlength=10), [50] * 10)
  np.testing.assert_array_equal(np.bincount(labels[a.holdout], minlength=10), [100] * 10)
  # n_max is capped by what remains after the balanced splits.
  assert a.counts[0] == 450
  np.testing.assert_array_equal(np.bincount(labels[a.train], minlength=10), a.counts)
  c = longtail.split_pool(labels, 10, 100, validation_per_class=50, holdout_per_class=100, seed=4)
  assert set(c.train) != set(a.train)


def test_no_validation_gives_standard_counts():
  labels = _pool(5000)
  split = longtail.split_pool(labels, 10, 100, validation_per_class=0)
  np.testing.assert_array_equal(np.bincount(labels[split.train], minlength=10),
                                [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50])


def test_class_too_small_names_the_problem():
  labels = np.array([0] * 100 + [1] * 5)
  with pytest.raises(ValueError, match="Class 1 has 5 images"):
    longtail.split_pool(labels, 2, 10, validation_per_class=10)
  with pytest.raises(ValueError, match="n_max=500"):
    longtail.split_pool(labels, 2, 1, n_max=500)


def test_shot_groups():
  counts = np.array([500, 300, 200, 120, 90, 50, 30, 19, 10, 5])
  thirds = longtail.shot_groups(counts)
  assert list(thirds["many"]) == [0, 1, 2, 3] and list(thirds["few"]) == [7, 8, 9]
  thresholds = longtail.shot_groups(counts, "thresholds")
  assert list(thresholds["medium"]) == [4, 5, 6] and list(thresholds["few"]) == [7, 8, 9]


@pytest.mark.parametrize("n_max,num_classes,imbalance,head,tail", [
    (5000, 10, 100, [5000, 2997, 1796], [139, 83, 50]),
    (5000, 10, 50, [5000, 3237, 2096], [238, 154, 100]),
    (5000, 10, 10, [5000, 3871, 2997], [834, 645, 500]),
    (500, 100, 100, [500, 477, 455], [5, 5, 5]),
    (500, 100, 50, [500, 480, 462], [10, 10, 10]),
    (500, 100, 10, [500, 488, 477], [52, 51, 50])])
def test_cifar_lt_counts_are_the_published_formula(n_max, num_classes, imbalance, head, tail):
  """floor(n_max * IF^(-c / (C - 1))) in float64, as the published CIFAR-LT construction."""
  counts = longtail.longtail_counts(n_max, num_classes, imbalance)
  assert counts[:3].tolist() == head and counts[-3:].tolist() == tail
  assert counts.tolist() == [int(n_max * imbalance**(-c / (num_classes - 1)))
                             for c in range(num_classes)]


def test_leftover_validation_costs_only_the_classes_without_spare_images():
  labels = _pool(5000)
  split = longtail.split_pool(labels, 10, 100, validation_per_class=100, validation_from="leftover")
  published = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
  np.testing.assert_array_equal(split.target_counts, published)
  np.testing.assert_array_equal(split.counts, [4900, *published[1:]])
  np.testing.assert_array_equal(np.bincount(labels[split.train], minlength=10), split.counts)
  np.testing.assert_array_equal(np.bincount(labels[split.validation], minlength=10), [100] * 10)
  assert not set(split.train) & set(split.validation)
  # The validation images are the same whatever the imbalance factor.
  other = longtail.split_pool(labels, 10, 10, validation_per_class=100, validation_from="leftover")
  np.testing.assert_array_equal(other.validation, split.validation)
  assert not set(other.train) & set(other.validation)
  # `pool` sets validation aside first: every class loses 2%.
  pool = longtail.split_pool(labels, 10, 100, validation_per_class=100)
  assert pool.counts.tolist() == [4900, 2937, 1760, 1055, 632, 379, 227, 136, 81, 49]
  with pytest.raises(ValueError, match="validation_from='somewhere'"):
    longtail.split_pool(labels, 10, 100, validation_from="somewhere")
