"""Accuracy and long-tail bias figures of predictions on a balanced split (DESIGN §5)."""

from __future__ import annotations

import numpy as np

from ltdd_jax.data import longtail


def classification_metrics(predictions: np.ndarray, labels: np.ndarray, counts: np.ndarray,
                           shot_rule: str = "thirds") -> dict:
  """Accuracy and bias figures of T models' predictions on a balanced test set.

  Args:
    predictions: [T, N] predicted classes.
    labels: [N] true classes.
    counts: [C] training images per class (defines many/medium/few).
    shot_rule: `thirds` or `thresholds` (see `longtail.shot_groups`).

  Returns:
    Accuracies in percent: acc_mean/std (over T), acc_per_model [T], per_class_acc [C] (mean over
    T) and its std
    over T, many/medium/few_acc, per_class_acc_std (spread over classes), head_tail_gap
    (many - few), pred_kl_uniform (KL of the predicted-class histogram from uniform, nats, mean over
    T), balanced_acc (mean of per-class accuracy); and what they were computed on, so a figure
    can order and band the classes as the report does: train_counts [C] and shot_classes (the
    many / medium / few class ids).
  """
  predictions = np.asarray(predictions)
  labels = np.asarray(labels)
  num_classes = len(counts)
  correct = predictions == labels[None]
  per_model = 100.0 * correct.mean(axis=1)
  per_class = np.stack([100.0 * correct[:, labels == c].mean(axis=1) if (labels == c).any()
                        else np.full(len(predictions), np.nan) for c in range(num_classes)], 1)
  per_class_mean = per_class.mean(axis=0)
  shots = longtail.shot_groups(counts, shot_rule)
  shot_acc = {k: float(np.nanmean(per_class_mean[v])) if len(v) else float("nan")
              for k, v in shots.items()}
  hist = np.stack([np.bincount(p, minlength=num_classes) / len(p) for p in predictions])
  with np.errstate(divide="ignore", invalid="ignore"):
    kl = np.where(hist > 0, hist * np.log(hist * num_classes), 0.0).sum(axis=1)
  return {
      "acc_mean": float(per_model.mean()),
      "acc_std": float(per_model.std()),
      "acc_per_model": per_model.tolist(),
      "per_class_acc": per_class_mean.tolist(),
      "per_class_acc_std_over_models": per_class.std(axis=0).tolist(),
      "balanced_acc": float(np.nanmean(per_class_mean)),
      "many_acc": shot_acc["many"],
      "medium_acc": shot_acc["medium"],
      "few_acc": shot_acc["few"],
      "per_class_acc_std": float(np.nanstd(per_class_mean)),
      "head_tail_gap": shot_acc["many"] - shot_acc["few"],
      "pred_kl_uniform": float(kl.mean()),
      "train_counts": np.asarray(counts).astype(int).tolist(),
      "shot_classes": {k: v.astype(int).tolist() for k, v in shots.items()},
  }


ACCURACY_KEYS = ("acc_mean", "acc_std", "acc_per_model")
SPLIT_PREFIX = {"test": "test", "validation": "val"}


def named_for_split(figures: dict, split: str) -> dict:
  """`classification_metrics` figures with the accuracy keys named for the split they were
  measured on: test_acc_mean / test_acc_std / test_acc_per_model on `test`, val_acc_* on
  `validation`, so a validation figure can never be read as a test one."""
  prefix = SPLIT_PREFIX[split]
  return {(f"{prefix}_{k}" if k in ACCURACY_KEYS else k): v for k, v in figures.items()}
