import numpy as np
import pytest

from ltdd_jax.methods import grouping

COUNTS = np.array([5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50])


@pytest.mark.parametrize("max_imbalance", [1.0, 2.0, 5.0, 10.0, 100.0])
def test_frequency_groups_respect_max_imbalance(max_imbalance):
  g = grouping.frequency_grouping(COUNTS, max_imbalance)
  for classes in g.groups:
    assert COUNTS[list(classes)].max() / COUNTS[list(classes)].min() <= max_imbalance
  # Bijective: class -> (group, within-group label) -> class.
  for c in range(10):
    group = g.group_of[c]
    assert g.groups[group][g.within_label_map(group)[c]] == c
  assert sum(g.group_sizes) == 10


def test_frequency_exact_group_count():
  for n in (1, 2, 3, 10):
    g = grouping.frequency_grouping(COUNTS, 5.0, num_groups=n)
    assert g.num_groups == n
    assert [c for grp in g.groups for c in grp] == list(range(10))  # contiguous in count order


def test_similarity_is_deterministic_and_respects_min_size():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(3, 8))
  feats = np.concatenate([centres[i] + 0.01 * rng.normal(size=(3, 8)) for i in range(3)])
  feats = np.concatenate([feats, centres[:1] + 0.01 * rng.normal(size=(1, 8))])
  a = grouping.similarity_grouping(feats, 3, 2, seed=0)
  b = grouping.similarity_grouping(feats, 3, 2, seed=0)
  assert a == b
  assert min(a.group_sizes) >= 2
  assert {0, 1, 2} <= set(a.groups[a.group_of[0]])


def test_manual_and_bad_partitions(tmp_path):
  g = grouping.manual_grouping(((2, 0), (1,)), 3)
  np.testing.assert_array_equal(g.within_label_map(0), [1, -1, 0])
  g.save(tmp_path / "g.json")
  assert grouping.Grouping.load(tmp_path / "g.json") == g
  with pytest.raises(ValueError, match="partition"):
    grouping.manual_grouping(((0, 1), (1, 2)), 3)
  with pytest.raises(ValueError, match="needs grouping.manual"):
    grouping.manual_grouping((), 3)


def test_groups_that_pair_head_and_tail_classes_are_named():
  """CIFAR-10-LT IF 100's similarity groups put a head and a tail class together (60x inside);
  frequency groups stay within max_imbalance and get no note."""
  pairs = grouping.Grouping(((0, 8), (1, 9), (2, 3, 4, 5, 6, 7)), 10)
  np.testing.assert_allclose(grouping.within_imbalance(pairs, COUNTS),
                             [5000 / 83, 2997 / 50, 1796 / 139])
  note = grouping.imbalanced_groups_note(pairs, COUNTS, 5.0)
  assert "{0, 8} 60x" in note and "{1, 9} 60x" in note and "{2, 3, 4, 5, 6, 7} 13x" in note
  assert grouping.imbalanced_groups_note(pairs, COUNTS, 100.0) is None
  assert grouping.imbalanced_groups_note(grouping.frequency_grouping(COUNTS, 5.0), COUNTS, 5.0) is None
  single = grouping.Grouping(((0,), tuple(range(1, 10))), 10)
  assert grouping.within_imbalance(single, COUNTS)[0] == 1.0
