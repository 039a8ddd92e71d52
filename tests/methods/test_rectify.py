import numpy as np
import pytest

from ltdd_jax import errors
from ltdd_jax.methods import rectify

COUNTS = np.array([500, 300, 180, 100, 60, 36, 22, 13, 8, 5])
LABELS = np.repeat(np.arange(10), 4)


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _biased_logits(bias, noise=0.0):
  """Labels that would be equally confident for every class, plus `bias` * log pi."""
  clean = np.where(np.eye(10)[LABELS] > 0, 2.0, 0.0)
  clean += noise * np.random.default_rng(0).normal(size=clean.shape)
  return clean + bias * rectify.log_prior(COUNTS)[None]


def test_tau_zero_is_the_identity():
  logits = _biased_logits(1.0, noise=0.5)
  probs, record = rectify.rectify(logits, LABELS, COUNTS, rectify.RectifySpec(mode="fixed", tau=0))
  np.testing.assert_allclose(probs, _softmax(logits), rtol=1e-6)
  np.testing.assert_allclose(record.own_after, record.own_before)
  assert record.moved == 0


@pytest.mark.parametrize("bias", [0.0, 0.7, 1.3, 2.45])
def test_adsa_recovers_a_known_frequency_bias_within_the_grid_step(bias):
  spec = rectify.RectifySpec(tau_step=0.05)
  probs, record = rectify.rectify(_biased_logits(bias), LABELS, COUNTS, spec)
  assert abs(record.tau - bias) <= spec.tau_step / 2 + 1e-9
  assert record.spread_after < record.spread_before or bias == 0
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
  # After: every class about equally confident in its own images.
  assert np.ptp(record.own_after) < 0.02


def test_rectified_labels_sum_to_one_and_keep_class_keeps_the_argmax():
  logits = _biased_logits(2.0, noise=0.8)
  own = logits.argmax(-1) == LABELS
  assert 0 < own.sum() < len(LABELS)  # some labels already point elsewhere
  spec = rectify.RectifySpec(mode="fixed", tau=3.0)
  free, free_record = rectify.rectify(logits, LABELS, COUNTS, spec)
  assert free_record.moved > 0  # ADSA's rule lets a strong tau move the argmax ...
  np.testing.assert_allclose(free.sum(-1), 1.0, rtol=1e-6)
  kept, record = rectify.rectify(logits, LABELS, COUNTS, rectify.RectifySpec(
      mode="fixed", tau=3.0, keep_class=True))
  np.testing.assert_allclose(kept.sum(-1), 1.0, rtol=1e-6)
  assert (kept.argmax(-1)[own] == LABELS[own]).all() and record.moved == 0  # ... keep_class not
  assert record.capped > 0
  # An image that did not point at its class gets the full tau.
  np.testing.assert_allclose(kept[~own], free[~own], rtol=1e-5)


def test_negative_taus_undo_a_tail_bias_and_keep_class_caps_them_too():
  spec = rectify.RectifySpec(tau_min=-2.0, tau_max=2.0, tau_step=0.1)
  _, record = rectify.rectify(_biased_logits(-1.0), LABELS, COUNTS, spec)
  assert abs(record.tau + 1.0) <= 0.05 + 1e-9
  logits = _biased_logits(-2.0, noise=0.8)
  own = logits.argmax(-1) == LABELS
  kept, record = rectify.rectify(logits, LABELS, COUNTS, rectify.RectifySpec(
      mode="fixed", tau=-3.0, keep_class=True))
  assert record.capped > 0 and (kept.argmax(-1)[own] == LABELS[own]).all()
  free, free_record = rectify.rectify(logits, LABELS, COUNTS, rectify.RectifySpec(
      mode="fixed", tau=-3.0))
  assert free_record.moved > 0


def test_group_space_from_probabilities():
  """The two-stage classifier's targets are probabilities: their log rectifies the same way."""
  probs = _softmax(_biased_logits(1.0))
  group_probs = np.stack([probs[:, :5].sum(-1), probs[:, 5:].sum(-1)], -1)
  group_labels = (LABELS >= 5).astype(int)
  group_counts = np.array([COUNTS[:5].sum(), COUNTS[5:].sum()])
  out, record = rectify.rectify(rectify.as_log_probs(group_probs), group_labels, group_counts,
                                rectify.RectifySpec())
  assert record.tau > 0 and record.spread_after < record.spread_before
  zero = np.zeros((1, 3))
  zero[0, 0] = 1.0  # a zero probability stays zero
  out, _ = rectify.rectify(rectify.as_log_probs(zero), np.array([0]), np.array([5, 3, 1]),
                           rectify.RectifySpec(mode="fixed", tau=1.0))
  np.testing.assert_array_equal(out, zero)
  empty = np.zeros((1, 3))  # an all-zero row (a group's probabilities underflowed) stays zero
  out, _ = rectify.rectify(rectify.as_log_probs(empty), np.array([0]), np.array([5, 3, 1]),
                           rectify.RectifySpec(mode="fixed", tau=1.0))
  np.testing.assert_array_equal(out, empty)


def test_validated_tau_prefers_the_identity_on_ties_and_bad_specs_fail():
  assert rectify.choose_validated({0.0: 50.0, 1.0: 50.0, 2.0: 40.0}) == 0.0
  assert rectify.choose_validated({0.0: 50.0, 1.5: 61.0, 0.5: 61.0}) == 0.5
  with pytest.raises(errors.InputError, match="rectify.mode must be"):
    rectify.RectifySpec(mode="bayes")
  with pytest.raises(errors.InputError, match="rectify.at=init needs a tau"):
    rectify.RectifySpec(mode="validation", at="init")
  with pytest.raises(errors.InputError, match="grid"):
    rectify.RectifySpec(tau_max=-1.0)
  with pytest.raises(errors.InputError, match="every class needs training images"):
    rectify.log_prior(np.array([3, 0]))
  np.testing.assert_allclose(rectify.RectifySpec(tau_step=0.5).grid, [0, 0.5, 1, 1.5, 2, 2.5, 3])
