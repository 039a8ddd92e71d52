"""Evidence for (or against) the grouping hypothesis, from experts already trained (DESIGN §6).

(a) per-class accuracy vs class count for the flat experts, with its correlation;
(b) the same inside each group, for the per-group experts;
(c) each class's share of the expert's parameter movement per epoch (the projection of its summed
    per-image gradients onto the actual movement theta_{e+1} - theta_e), against its share of data.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from ltdd_jax import reporting
from ltdd_jax.core import ensemble
from ltdd_jax.methods import experts as experts_lib
from ltdd_jax.methods import grouping as grouping_lib


def correlation(acc: np.ndarray, counts: np.ndarray) -> dict:
  """Pearson (vs log count) and Spearman correlation of per-class accuracy with class count."""
  acc, counts = np.asarray(acc, np.float64), np.asarray(counts, np.float64)
  if len(acc) < 3 or np.ptp(counts) == 0 or np.ptp(acc) == 0:
    return {"pearson_log_count": float("nan"), "spearman": float("nan"), "num_classes": len(acc)}
  return {"pearson_log_count": float(stats.pearsonr(np.log(counts), acc)[0]),
          "spearman": float(stats.spearmanr(counts, acc)[0]), "num_classes": len(acc)}


def expert_per_class_accuracy(expert_set: experts_lib.ExpertSet, images, labels, epoch: int = -1,
                              batch_size: int = 1000) -> np.ndarray:
  """[K, C] per-class accuracy (%) of every expert at `epoch` (-1: the last) on (images, labels)
  (labels in the experts' own label space, C = their outputs)."""
  pred = expert_set.logits(images, epoch, batch_size=batch_size).argmax(-1)
  return np.stack([100 * (pred[:, labels == c] == c).mean(1)
                   for c in range(expert_set.num_classes)], 1)


def movement_shares(expert_set: experts_lib.ExpertSet, images, labels, expert: int = 0,
                    chunk: int = 2000) -> np.ndarray:
  """[E, C] share of each class in the parameter movement of one expert, epoch by epoch.

  share[e, c] = <-g_c(theta_e), delta_e> / sum_c' <-g_c'(theta_e), delta_e>, where g_c is the sum of
  class c's per-image loss gradients (no augmentation) and delta_e = theta_{e+1} - theta_e. Every
  <g_i, delta_e> is one forward-mode directional derivative (a JVP along delta_e), so all classes
  cost one pass over the data instead of one gradient per class.
  """
  num_classes = expert_set.num_classes
  apply_fn = ensemble.make_apply(expert_set.model)
  trajectory = expert_set.load(expert)

  @jax.jit
  def directional(params, delta, x, y):
    per_image = lambda p: -jnp.take_along_axis(jax.nn.log_softmax(apply_fn(p, x)), y[:, None],
                                               1)[:, 0]
    _, tangent = jax.jvp(per_image, (params,), (delta,))
    return jax.ops.segment_sum(tangent, y, num_segments=num_classes)

  shares = []
  for e in range(expert_set.epochs):
    theta = jax.tree.map(lambda x: x[e], trajectory)
    delta = jax.tree.map(lambda x: x[e + 1] - x[e], trajectory)
    proj = -sum(np.asarray(directional(theta, delta, jnp.asarray(images[i:i + chunk]),
                                       jnp.asarray(labels[i:i + chunk])), np.float64)
                for i in range(0, len(images), chunk))
    shares.append(proj / proj.sum())
  return np.stack(shares)


def within_group_gap(acc: np.ndarray, counts: np.ndarray, classes) -> float:
  """Accuracy of a group's most frequent class minus its least frequent one (points): the count
  bias left inside the group."""
  classes = list(classes)
  order = np.argsort(-np.asarray(counts)[classes], kind="stable")
  return float(acc[order[0]] - acc[order[-1]])


def bias_by_epoch(data, grouping: grouping_lib.Grouping, flat: experts_lib.ExpertSet,
                  within: dict[int, experts_lib.ExpertSet], epochs,
                  batch_size: int = 1000) -> list[dict]:
  """The hypothesis' premise as experts get stronger. At each epoch: the flat experts' balanced
  test accuracy and count bias over all classes (Pearson of accuracy with log count), and for
  every multi-class group the within-group gap (`within_group_gap`) of the flat experts and of
  the group's own experts (mean over groups in `mean_*`). If grouping removes the bias that
  stronger experts keep, the group experts' gap stays below the flat experts' at every epoch."""
  counts = np.asarray(data.counts)
  rows = []
  for epoch in epochs:
    flat_acc = expert_per_class_accuracy(flat, data.test_images, data.test_labels, epoch,
                                         batch_size).mean(0)
    row = {"epoch": int(epoch), "flat_balanced_acc": float(flat_acc.mean()),
           "flat_pearson_log_count": correlation(flat_acc, counts)["pearson_log_count"],
           "flat_gap": {}, "group_gap": {}}
    for g, classes in enumerate(grouping.groups):
      if len(classes) < 2:
        continue
      row["flat_gap"][g] = within_group_gap(flat_acc[list(classes)], counts, classes)
      if g in within and epoch <= within[g].epochs:
        images, labels = within[g].labelling.apply(data.test_images, data.test_labels)
        acc = expert_per_class_accuracy(within[g], images, labels, epoch, batch_size).mean(0)
        row["group_gap"][g] = within_group_gap(acc, counts, classes)
    row["mean_flat_gap"] = float(np.mean(list(row["flat_gap"].values()))) if row["flat_gap"] else None
    row["mean_group_gap"] = (float(np.mean(list(row["group_gap"].values())))
                             if row["group_gap"] else None)
    rows.append(row)
  return rows


def default_epochs(num_epochs: int) -> list[int]:
  """Epochs the bias is followed at: about every quarter of training, and the last."""
  return sorted({max(1, round(num_epochs * q / 4)) for q in (1, 2, 3, 4)})


def analyze(data, grouping: grouping_lib.Grouping, flat: experts_lib.ExpertSet,
            within: dict[int, experts_lib.ExpertSet], workdir, batch_size: int = 1000) -> dict:
  """Runs (a), (b), (c) on the flat experts and each group's own (`within`: group -> set);
  writes groups_report.json and PNG plots; returns the report. `batch_size`: images per forward
  pass."""
  workdir = pathlib.Path(workdir)
  counts = np.asarray(data.counts)
  flat_acc = expert_per_class_accuracy(flat, data.test_images, data.test_labels,
                                       batch_size=batch_size).mean(0)
  report = {"counts": counts.tolist(), "grouping": grouping.to_dict(),
            "flat": {"per_class_acc": flat_acc.tolist(), **correlation(flat_acc, counts)},
            "flat_within_groups": {}, "group_experts": {}}
  group_acc = np.full(data.num_classes, np.nan)
  for g, classes in enumerate(grouping.groups):
    classes = list(classes)
    # The flat expert's accuracy restricted to the group, for a like-for-like comparison.
    report["flat_within_groups"][g] = correlation(flat_acc[classes], counts[classes])
    if g not in within:
      continue
    images, labels = within[g].labelling.apply(data.test_images, data.test_labels)
    acc = expert_per_class_accuracy(within[g], images, labels, batch_size=batch_size).mean(0)
    group_acc[classes] = acc
    report["group_experts"][g] = {"classes": classes, "per_class_acc": acc.tolist(),
                                  **correlation(acc, counts[classes])}
  shares = movement_shares(flat, data.train_images, data.train_labels)
  data_share = counts / counts.sum()
  report["movement_share_per_epoch"] = shares.tolist()
  report["movement_share_mean"] = shares.mean(0).tolist()
  report["data_share"] = data_share.tolist()
  report["movement_vs_data"] = correlation(shares.mean(0), counts)
  report["bias_by_epoch"] = bias_by_epoch(data, grouping, flat, within,
                                          default_epochs(flat.epochs), batch_size)
  _plots(workdir, counts, flat_acc, group_acc, grouping, shares.mean(0), data_share)
  reporting.write_json(workdir / "groups_report.json", report)
  return report


def _plots(workdir, counts, flat_acc, group_acc, grouping, movement, data_share) -> None:
  """groups_analysis.png: (left) per-class accuracy against class count, flat experts (o) and
  each group's own experts (x), coloured by group; (right) each class's share of the flat expert's
  parameter movement against its share of the data, with the line where they are equal."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  colors = plt.cm.tab10(grouping.group_of % 10)
  axes[0].scatter(counts, flat_acc, c=colors, marker="o")
  if np.isfinite(group_acc).any():
    axes[0].scatter(counts, group_acc, c=colors, marker="x")
  axes[0].set_xscale("log")
  axes[0].set_xlabel("training images of the class")
  axes[0].set_ylabel("test accuracy (%)")
  legend = [Line2D([], [], marker="o", ls="", color="gray", label="flat experts"),
            Line2D([], [], marker="x", ls="", color="gray", label="the group's own experts")]
  legend += [Line2D([], [], marker="s", ls="", color=plt.cm.tab10(g % 10),
                    label=f"group {g}: classes {', '.join(map(str, classes))}")
             for g, classes in enumerate(grouping.groups)]
  axes[0].legend(handles=legend, fontsize=6)
  axes[0].set_title("Per-class accuracy against class count", fontsize=9)
  axes[1].scatter(data_share, movement, c=colors)
  lim = max(float(np.max(data_share)), float(np.max(movement))) * 1.1
  axes[1].plot([0, lim], [0, lim], "k--", lw=0.8, label="movement share = data share")
  axes[1].legend(fontsize=7)
  axes[1].set_xlabel("share of the data")
  axes[1].set_ylabel("share of the flat expert's parameter movement")
  axes[1].set_title("Which classes move the expert", fontsize=9)
  fig.tight_layout()
  fig.savefig(workdir / "groups_analysis.png", dpi=100)
  plt.close(fig)
