"""Soft-label bias rectification, ADSA-style: the `+rectify` plugin (DESIGN §4).

Soft labels made by experts trained on long-tailed data inherit their head bias. ADSA (Jiang et
al., NeurIPS 2025) removes it post hoc in logit space, as logit adjustment does:

  p(y | x) = softmax(f(x))  ->  softmax(f(x) - tau * log pi_y),

with pi the training set's class frequencies, and picks tau so that the labels are equally
confident for every class: the standard deviation over classes of the class-averaged own-class
probability (mean over the images of class c of p(c | x)) is smallest, computed on the distilled
images themselves, with no training (`mode=adsa`). `mode=validation` takes tau from a small grid by
the validation accuracy of networks trained on the rectified set (the stage layer trains them);
`mode=fixed` takes a given tau. tau = 0 is the identity.

Everything here works on log-probabilities of any label space (the classes; the two-stage
classifier's groups or the classes within one group) with that space's prior, so the same function
rectifies a set's class labels and the two-stage classifier's group and within-group targets.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ltdd_jax import errors

MODES = ("adsa", "validation", "fixed")
WHERE = ("final", "init", "both")


@dataclasses.dataclass(frozen=True)
class RectifySpec:
  """How soft labels are rectified (`config.rectify`).

  Attributes:
    mode: `adsa` (tau minimising the spread of the classes' own-class confidence on the set's own
      images), `validation` (tau in `validation_taus` with the best validation accuracy) or
      `fixed` (`tau`).
    tau: the strength for `fixed`.
    tau_min, tau_max, tau_step: the grid `adsa` searches (inclusive).
    validation_taus: the candidates `validation` evaluates.
    at: `final` (the finished set's labels, as ADSA does), `init` (the initial soft labels, before
      distillation learns them) or `both`.
    keep_class: an image whose label's argmax is its own class keeps it: its tau is capped where
      another class would overtake (not in ADSA, which lets the argmax move).
  """
  mode: str = "adsa"
  tau: float = 1.0
  tau_min: float = 0.0
  tau_max: float = 3.0
  tau_step: float = 0.01
  validation_taus: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)
  at: str = "final"
  keep_class: bool = False

  def __post_init__(self):
    if self.mode not in MODES:
      raise errors.InputError(f"rectify.mode must be one of {', '.join(MODES)}, got "
                              f"{self.mode!r}.")
    if self.at not in WHERE:
      raise errors.InputError(f"rectify.at must be one of {', '.join(WHERE)}, got {self.at!r}.")
    if not (self.tau_step > 0 and self.tau_max >= self.tau_min):
      raise errors.InputError(f"rectify: the tau grid [{self.tau_min}, {self.tau_max}] step "
                              f"{self.tau_step} is empty; need tau_step > 0, tau_max >= tau_min.")
    if self.mode == "validation" and not self.validation_taus:
      raise errors.InputError("rectify.mode=validation needs rectify.validation_taus.")
    if self.mode == "validation" and self.at != "final":
      raise errors.InputError(f"rectify.at={self.at} needs a tau before any set exists to "
                              "validate: use rectify.mode=adsa or fixed, or rectify.at=final.")

  @property
  def grid(self) -> np.ndarray:
    """[T] the taus `adsa` searches, tau_min to tau_max inclusive."""
    count = int(np.floor((self.tau_max - self.tau_min) / self.tau_step + 1e-9)) + 1
    return np.round(self.tau_min + self.tau_step * np.arange(count), 10)


def log_prior(counts: np.ndarray) -> np.ndarray:
  """[C] log class frequencies of the training set (`counts` [C] images per class, all > 0)."""
  counts = np.asarray(counts, np.float64)
  if (counts <= 0).any():
    raise errors.InputError(f"rectify: every class needs training images for its prior; counts "
                            f"{counts.astype(int).tolist()}.")
  return np.log(counts / counts.sum())


def as_log_probs(probs: np.ndarray) -> np.ndarray:
  """[N, C] probabilities -> log-probabilities (0 -> -inf, which stays 0 after rectification)."""
  with np.errstate(divide="ignore"):
    return np.log(np.asarray(probs, np.float64))


def rectified(logits: np.ndarray, prior: np.ndarray, tau) -> np.ndarray:
  """softmax(logits - tau * log pi): [N, C] logits (or log-probabilities), [C] log prior, tau a
  float or [N, 1] per image -> [N, C] probabilities (float64)."""
  shifted = np.asarray(logits, np.float64) - tau * prior[None]
  top = shifted.max(-1, keepdims=True)
  weights = np.exp(shifted - np.where(np.isfinite(top), top, 0.0))
  total = weights.sum(-1, keepdims=True)
  return np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)  # 0 rows stay 0


def class_keeping_tau(logits: np.ndarray, labels: np.ndarray, prior: np.ndarray,
                      tau: float) -> np.ndarray:
  """[N, 1] per image, tau capped so that an image whose own class is its label's argmax keeps it.

  Class y stays the argmax iff (l_y - l_c) >= tau (log pi_y - log pi_c) for every c: for tau > 0
  only the classes rarer than y bind (tau <= margin / prior gap), for tau < 0 the more frequent
  ones. Images whose argmax is another class keep the full tau."""
  logits = np.asarray(logits, np.float64)
  rows = np.arange(len(labels))
  margin = logits[rows, labels][:, None] - logits  # >= 0 where y is the argmax
  gap = prior[labels][:, None] - prior[None]  # log pi_y - log pi_c
  binding = gap * np.sign(tau) > 0
  with np.errstate(divide="ignore", invalid="ignore"):
    bound = np.where(binding, margin / np.abs(gap), np.inf).min(-1)
  capped = np.sign(tau) * np.minimum(abs(tau), bound * (1 - 1e-6))
  keeps = logits.argmax(-1) == labels
  return np.where(keeps, capped, tau)[:, None]


def own_class_confidence(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
  """[C] per class, the mean over its images of the probability their label gives it (NaN for a
  class without images)."""
  labels = np.asarray(labels)
  own = probs[np.arange(len(labels)), labels]
  sums = np.bincount(labels, own, minlength=num_classes)
  counts = np.bincount(labels, minlength=num_classes)
  with np.errstate(invalid="ignore"):
    return sums / counts


def spread(confidence: np.ndarray) -> float:
  """ADSA's criterion: the standard deviation over classes of their own-class confidence."""
  return float(np.nanstd(confidence))


@dataclasses.dataclass(frozen=True)
class Rectification:
  """One rectification of one label space.

  Attributes:
    tau: the strength applied.
    mode: how it was chosen.
    own_before, own_after: [C] per-class mean own-class probability before / after.
    spread_before, spread_after: ADSA's criterion before / after.
    scores: for `validation`, {tau: validation accuracy}.
    moved: images whose label argmax was their own class and is another after.
    capped: images whose tau `keep_class` capped.
  """
  tau: float
  mode: str
  own_before: np.ndarray
  own_after: np.ndarray
  scores: dict = dataclasses.field(default_factory=dict)
  moved: int = 0
  capped: int = 0

  @property
  def spread_before(self) -> float:
    return spread(self.own_before)

  @property
  def spread_after(self) -> float:
    return spread(self.own_after)

  def record(self) -> dict:
    """JSON-friendly fields for metrics.jsonl and report.json."""
    out = {"tau": self.tau, "mode": self.mode, "spread_before": self.spread_before,
           "spread_after": self.spread_after,
           "own_before": np.round(self.own_before, 6).tolist(),
           "own_after": np.round(self.own_after, 6).tolist(), "moved": self.moved,
           "capped": self.capped}
    if self.scores:
      out["validation_scores"] = {str(k): v for k, v in self.scores.items()}
    return out


def adsa_tau(logits: np.ndarray, labels: np.ndarray, prior: np.ndarray, grid: np.ndarray) -> float:
  """The tau in `grid` whose rectified labels have the smallest spread of own-class confidence
  (the smallest |tau| on ties, as `choose_validated`)."""
  num_classes = logits.shape[-1]
  values = np.asarray([spread(own_class_confidence(rectified(logits, prior, t), labels,
                                                   num_classes)) for t in grid])
  best = np.flatnonzero(values == np.nanmin(values))
  return float(grid[best[np.argmin(np.abs(grid[best]))]])


def rectify_logits(logits: np.ndarray, labels: np.ndarray, counts: np.ndarray, spec: RectifySpec,
                   tau: float | None = None, scores: dict | None = None):
  """Rectifies one label space, in logit space.

  Args:
    logits: [N, C] label logits or log-probabilities (`as_log_probs`).
    labels: [N] the class (in this label space) each image stands for.
    counts: [C] training images per class of this label space (its prior).
    spec: the mode and grid; `tau` given overrides them (the validated tau; a fixed one).
    scores: the validation accuracies behind a given tau, for the record.

  Returns:
    ([N, C] logits - tau * log pi (float64; tau per image under `keep_class`), Rectification).
  """
  logits = np.asarray(logits, np.float64)
  prior = log_prior(counts)
  num_classes = logits.shape[-1]
  if tau is None:
    if spec.mode == "validation":
      raise errors.InputError("rectify.mode=validation: the tau comes from the validation split; "
                              "the stage layer chooses it (`choose_validated`).")
    tau = spec.tau if spec.mode == "fixed" else adsa_tau(logits, labels, prior, spec.grid)
  per_image = class_keeping_tau(logits, labels, prior, tau) if spec.keep_class else tau
  shifted = logits - per_image * prior[None]
  before, after = rectified(logits, prior, 0.0), rectified(shifted, prior, 0.0)
  was_own = before.argmax(-1) == labels
  record = Rectification(
      float(tau), spec.mode, own_class_confidence(before, labels, num_classes),
      own_class_confidence(after, labels, num_classes), dict(scores or {}),
      moved=int((was_own & (after.argmax(-1) != labels)).sum()),
      capped=int((np.asarray(per_image) != tau).sum()) if spec.keep_class else 0)
  return shifted, record


def rectify(logits: np.ndarray, labels: np.ndarray, counts: np.ndarray, spec: RectifySpec,
            tau: float | None = None, scores: dict | None = None,
            probs: np.ndarray | None = None):
  """`rectify_logits`, as probabilities: ([N, C] rectified soft labels float32, Rectification).

  `probs`: the labels as they are (softmax of `logits`); tau 0 returns them unchanged, bit for bit,
  rather than a float64 softmax of the same logits."""
  shifted, record = rectify_logits(logits, labels, counts, spec, tau, scores)
  if record.tau == 0 and probs is not None:
    return probs, record
  return rectified(shifted, np.zeros(shifted.shape[-1]), 0.0).astype(np.float32), record


def choose_validated(scores: dict) -> float:
  """`validation` mode: the tau with the highest validation accuracy ({tau: acc}; the smallest
  |tau| on ties, so the identity wins when rectifying does not help)."""
  if not scores:
    raise errors.InputError("rectify.mode=validation: no validation scores to choose from.")
  best = max(scores.values())
  return float(min((t for t, v in scores.items() if v == best), key=lambda t: (abs(t), t)))
