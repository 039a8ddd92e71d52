import numpy as np

from ltdd_jax.evaluation import metrics


def test_metrics_on_known_predictions():
  labels = np.repeat(np.arange(3), 4)  # balanced test set, 3 classes
  counts = np.array([100, 10, 1])
  perfect = labels[None]
  biased = np.zeros((1, 12), int)  # always predicts the head class
  m = metrics.classification_metrics(np.concatenate([perfect, perfect]), labels, counts)
  assert m["acc_mean"] == 100 and m["acc_std"] == 0 and m["pred_kl_uniform"] == 0
  b = metrics.classification_metrics(biased, labels, counts)
  np.testing.assert_allclose(b["per_class_acc"], [100, 0, 0])
  assert (b["many_acc"], b["medium_acc"], b["few_acc"], b["head_tail_gap"]) == (100, 0, 0, 100)
  np.testing.assert_allclose(b["pred_kl_uniform"], np.log(3))
  np.testing.assert_allclose(b["balanced_acc"], b["acc_mean"])
  # What a figure needs to order the classes and shade the bands the figures were computed on.
  assert b["train_counts"] == [100, 10, 1]
  assert b["shot_classes"] == {"many": [0], "medium": [1], "few": [2]}


def test_accuracy_keys_are_named_for_their_split():
  figures = {"acc_mean": 1.0, "acc_std": 0.5, "acc_per_model": [1.0], "few_acc": 3.0}
  assert set(metrics.named_for_split(figures, "test")) == {
      "test_acc_mean", "test_acc_std", "test_acc_per_model", "few_acc"}
  assert set(metrics.named_for_split(figures, "validation")) == {
      "val_acc_mean", "val_acc_std", "val_acc_per_model", "few_acc"}



