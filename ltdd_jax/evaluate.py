"""The evaluation protocol (DESIGN §5): T fresh networks trained on a labelled set, tested on the
balanced test split, with long-tail bias figures.

T networks train as one vmapped program: SGD momentum 0.9, weight decay 5e-4, lr/10 at half the
epochs, DSA on, soft-label cross-entropy when labels are soft. The reported accuracy is the final
one (never the best over test evaluations).

Long evaluations resume: given a folder, `train_networks` saves the ensemble's state at most every
`evaluate.checkpoint_seconds` and once trained, and continues from it; epoch e draws from
`fold_in(key, e)`, so a resumed evaluation trains exactly the networks an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import time
from typing import Any

from absl import logging

import jax
import jax.numpy as jnp
import numpy as np

from ltdd_jax import checkpoints, errors, models, parallel, reporting, training
from ltdd_jax import experts as experts_lib
from ltdd_jax.data import longtail

REPORT_FIELDS = ("method", "dataset", "imbalance_factor", "ipc", "test_acc_mean", "test_acc_std",
                 "per_class_acc", "many_acc", "medium_acc", "few_acc", "per_class_acc_std",
                 "head_tail_gap", "pred_kl_uniform", "wall_seconds")


def classification_metrics(predictions: np.ndarray, labels: np.ndarray, counts: np.ndarray,
                           shot_rule: str = "thirds") -> dict:
  """Accuracy and bias figures of T models' predictions on a balanced test set.

  Args:
    predictions: [T, N] predicted classes.
    labels: [N] true classes.
    counts: [C] training images per class (defines many/medium/few).
    shot_rule: `thirds` or `thresholds` (see `longtail.shot_groups`).

  Returns:
    Accuracies in percent: test_acc_mean/std (over T), per_class_acc [C] (mean over T) and its std
    over T, many/medium/few_acc, per_class_acc_std (spread over classes), head_tail_gap
    (many - few), pred_kl_uniform (KL of the predicted-class histogram from uniform, nats, mean over
    T), balanced_acc (mean of per-class accuracy).
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
      "test_acc_mean": float(per_model.mean()),
      "test_acc_std": float(per_model.std()),
      "test_acc_per_model": per_model.tolist(),
      "per_class_acc": per_class_mean.tolist(),
      "per_class_acc_std_over_models": per_class.std(axis=0).tolist(),
      "balanced_acc": float(np.nanmean(per_class_mean)),
      "many_acc": shot_acc["many"],
      "medium_acc": shot_acc["medium"],
      "few_acc": shot_acc["few"],
      "per_class_acc_std": float(np.nanstd(per_class_mean)),
      "head_tail_gap": shot_acc["many"] - shot_acc["few"],
      "pred_kl_uniform": float(kl.mean()),
  }


@dataclasses.dataclass(frozen=True, eq=False)
class LabelledSet:
  """A labelled training set evaluation consumes: a distilled set or a baseline's selection.

  Attributes:
    images: [N, H, W, C] model-space images.
    labels: [N] the class each image stands for (decides, e.g., which group's networks train on it).
    targets: [N] int labels or [N, C] target probabilities (what the networks fit).
    lr: learning rate the networks train with (a distilled set's learned lr).
    epochs: training epochs.
    ipc: images per class (None for the full long-tailed set).
    method: what made the set (`mtt`, `random`, ...), for reports.
    learned_lrs: a set distilled against several objectives: lr per objective (`groups`,
      `group_<g>`), which the two-stage classifier's networks train with.
  """
  images: np.ndarray
  labels: np.ndarray
  targets: np.ndarray
  lr: float
  epochs: int
  ipc: int | None
  method: str
  learned_lrs: dict = dataclasses.field(default_factory=dict)

  def __len__(self) -> int:
    return len(self.images)

  def subset(self, index: np.ndarray, targets: np.ndarray, lr: float) -> "LabelledSet":
    """The images `index` ([M] ints) with other targets ([M] or [M, K]) and lr: what one network
    of a two-stage classifier trains on."""
    return dataclasses.replace(self, images=self.images[index], labels=self.labels[index],
                               targets=targets, lr=lr)


@dataclasses.dataclass(frozen=True, eq=False)
class Protocol:
  """How evaluation networks train and test (DESIGN §5), from `config.evaluate` and the few other
  values the protocol reads.

  Attributes:
    model: `config.model` (the architecture evaluated, and the base of the cross-architecture rows).
    dsa: `config.dsa` (how DSA augments when `augment` is on).
    num_models: T networks per set.
    batch_size, momentum, weight_decay: their SGD.
    augment: DSA on every training batch (`evaluate.dsa`).
    archs: architectures evaluated (the first one's figures are the report's top level).
    cross_arch_width: base width of architectures other than `model.name`.
    test_batch_size: images per forward pass when testing.
    shot_rule: how classes split into many / medium / few.
    checkpoint_seconds: least time between two saves of a resumable evaluation's state.
  """
  model: Any
  dsa: Any
  num_models: int = 3
  batch_size: int = 256
  momentum: float = 0.9
  weight_decay: float = 5e-4
  augment: bool = True
  archs: tuple[str, ...] = ("convnet",)
  cross_arch_width: int = 64
  test_batch_size: int = 1000
  shot_rule: str = "thirds"
  checkpoint_seconds: float = 300.0

  @classmethod
  def from_config(cls, config) -> "Protocol":
    """`config.evaluate` with `config.model`, `config.dsa` and `config.data.shot_rule`."""
    ev = config.evaluate
    return cls(model=config.model, dsa=config.dsa, num_models=ev.num_models,
               batch_size=ev.batch_size, momentum=ev.momentum, weight_decay=ev.weight_decay,
               augment=ev.dsa, archs=tuple(ev.archs), cross_arch_width=ev.cross_arch_width,
               test_batch_size=ev.test_batch_size, shot_rule=config.data.shot_rule,
               checkpoint_seconds=ev.checkpoint_seconds)

  def train_spec(self, num_images: int, balance: experts_lib.Balance) -> training.TrainSpec:
    """TrainSpec of an evaluation network (batch capped at the set size; an epoch draws as many
    images as the set has, whatever the sampling)."""
    batch = min(self.batch_size, num_images)
    return training.TrainSpec(batch_size=batch,
                              steps_per_epoch=training.steps_per_epoch(num_images, batch),
                              momentum=self.momentum, weight_decay=self.weight_decay,
                              sampling=balance.sampling or "instance", loss=balance.loss or "ce",
                              dsa=self.augment)

  def logits(self, model, params, images: np.ndarray) -> np.ndarray:
    """[T, N, C] logits of the T trained networks on `images`."""
    return training.model_logits(model, params, images, self.test_batch_size,
                                 self.model.ensemble_impl)


class EvaluationDivergedError(errors.DivergedError):
  """The evaluation networks' loss stopped being finite (the set's lr is too high for them)."""


def hard_labels(targets: np.ndarray) -> np.ndarray:
  """[N] int labels of hard ([N]) or soft ([N, C]) targets."""
  targets = np.asarray(targets)
  return targets.astype(np.int32) if targets.ndim == 1 else targets.argmax(-1).astype(np.int32)


def subfolder(directory: pathlib.Path | None, name: str) -> pathlib.Path | None:
  """`directory / name`, or None when there is no directory (an evaluation that does not save)."""
  return None if directory is None else pathlib.Path(directory) / name


def set_fingerprint(train_set: LabelledSet, seed: int, num_models: int, recipe: str) -> np.ndarray:
  """[32] uint8 SHA-256 of what an evaluation trains on (images, targets, lr, epochs, seed, T) and
  how (`recipe`: the model, the training spec, DSA): a saved state whose fingerprint differs was
  made by another evaluation and is not resumed."""
  digest = hashlib.sha256()
  for array in (train_set.images, train_set.targets):
    array = np.ascontiguousarray(array)
    digest.update(f"{array.dtype}{array.shape}".encode())
    digest.update(array.tobytes())
  digest.update(repr((float(train_set.lr), int(train_set.epochs), int(seed), int(num_models),
                      recipe)).encode())
  return np.frombuffer(digest.digest(), np.uint8).copy()


def training_recipe(model, spec: training.TrainSpec, dsa) -> str:
  """Everything besides the set that decides what evaluation networks become, as text."""
  return f"{model!r}|{spec!r}|{json.dumps(dsa.to_dict(), sort_keys=True, default=str)}"


def open_state(checkpoint_dir: pathlib.Path, state, fingerprint: np.ndarray):
  """(store, epochs done, state): the latest save in `checkpoint_dir`, or 0 and `state` when there
  is none. A save of another evaluation (fingerprint), of other shapes, or one that cannot be
  read is deleted, not an error: an evaluation's saved state is only ever a shortcut."""
  store = checkpoints.Checkpoints(checkpoint_dir, max_to_keep=1)
  step = store.latest_step()
  if step is None:
    return store, 0, state
  try:
    saved = store.restore(step, {"state": state, "fingerprint": fingerprint})
    reason = "it was saved by another evaluation"
  except checkpoints.CheckpointError as e:
    saved, reason = None, f"unreadable or of other shapes: {e}"
  if saved is not None and np.array_equal(saved["fingerprint"], fingerprint):
    return store, step, saved["state"]
  logging.warning("Evaluation state in %s not resumed (%s); training from epoch 0.",
                  store.directory, reason)
  store.delete(step)
  return store, 0, state


def train_networks(protocol: Protocol, model, train_set: LabelledSet, num_classes: int, seed: int,
                   mesh, label: str = "evaluate",
                   balance: experts_lib.Balance = experts_lib.Balance(),
                   checkpoint_dir: pathlib.Path | None = None):
  """Trains `protocol.num_models` fresh networks on a labelled set; returns params [T, ...].

  Args:
    protocol: the evaluation `Protocol`.
    model: a Flax classifier with `num_classes` outputs.
    train_set: what they fit (`targets`), with its lr (divided by 10 at half the epochs) and epochs.
    num_classes: C of `train_set.targets`.
    seed: initialisation and data-order seed.
    mesh: device mesh (the model axis is sharded over it).
    label: progress label.
    balance: sampling / loss overrides (the protocol's: instance, ce).
    checkpoint_dir: where the ensemble's state is saved (at most every
      `protocol.checkpoint_seconds`, and when trained) and resumed from; None: no saves.

  Raises:
    EvaluationDivergedError: at the first epoch whose loss, or whose state where it is saved or
      returned, is not finite (nothing non-finite is saved).
  """
  images, targets = train_set.images, train_set.targets
  lr, epochs = train_set.lr, train_set.epochs
  num_models = protocol.num_models
  spec = protocol.train_spec(len(images), balance)
  epoch_fn = experts_lib.make_epoch_fn(training.make_apply(model), spec, protocol.dsa, num_classes,
                                       protocol.model.ensemble_impl)
  params = training.init_ensemble(model, jax.random.key(seed), num_models, images.shape[1:])
  state = (params, jax.tree.map(jnp.zeros_like, params))
  first_epoch, store = 0, None
  if checkpoint_dir is not None:
    fingerprint = set_fingerprint(train_set, seed, num_models,
                                  training_recipe(model, spec, protocol.dsa))
    store, first_epoch, state = open_state(checkpoint_dir, state, fingerprint)
  state = parallel.shard_leading(state, mesh)
  images_d, targets_d, labels_d = parallel.replicate(
      (jnp.asarray(images), jnp.asarray(targets), jnp.asarray(hard_labels(targets))), mesh)
  base = jax.random.key(seed + 7919)
  progress = reporting.Progress(label, epochs, start=first_epoch)
  last_save = time.time()
  for epoch in range(first_epoch, epochs):
    epoch_lr = lr if epoch < epochs // 2 else lr * 0.1
    keys = jax.random.split(jax.random.fold_in(base, epoch), num_models)
    params, velocity, loss = epoch_fn(*state, keys, jnp.float32(epoch_lr), images_d, targets_d,
                                      labels_d)
    state = (params, velocity)
    loss = np.asarray(loss)
    last = epoch + 1 == epochs
    saving = store is not None and (last or time.time() - last_save >= protocol.checkpoint_seconds)
    # The loss is taken before each step's update: the state is checked too, where it matters
    # (before a save, and the networks returned).
    if not np.isfinite(loss).all() or ((saving or last) and not all_finite(state)):
      raise EvaluationDivergedError(
          f"{label}: evaluation training diverged at epoch {epoch + 1} (loss per network "
          f"{loss.tolist()}); the learning rate {lr} is too high for this set.")
    progress.update(epoch + 1, f"loss {float(loss.mean()):.3f}")
    if saving:
      store.save(epoch + 1, {"state": state, "fingerprint": fingerprint})
      last_save = time.time()
  if store is not None:
    store.close()
  return state[0]


def all_finite(tree) -> bool:
  """Whether every leaf of a pytree is finite (one device-to-host transfer)."""
  return bool(jax.tree.reduce(jnp.logical_and, jax.tree.map(lambda x: jnp.isfinite(x).all(), tree)))


def evaluate_set(protocol: Protocol, data, train_set: LabelledSet, *, seed: int, mesh,
                 split: str = "test", checkpoint_dir: pathlib.Path | None = None) -> dict:
  """Trains on a labelled set with the protocol and tests on a balanced split.

  `split` is `test` for reported numbers and `validation` for model selection and tuning inside a
  run (DESIGN §1: never test).

  Every architecture in `protocol.archs` is evaluated; the top-level fields are the first one's,
  and `archs` holds one row per architecture. With `checkpoint_dir`, each architecture's training
  resumes from `<checkpoint_dir>/<arch>`.

  Returns:
    A report dict with REPORT_FIELDS and more (see `classification_metrics`).
  """
  start = time.time()
  eval_images, eval_labels = split_arrays(data, split)
  rows = {}
  for arch in protocol.archs:
    width = None if arch == protocol.model.name else protocol.cross_arch_width
    model = models.make_classifier(protocol.model, data.num_classes, arch, width)
    params = train_networks(protocol, model, train_set, data.num_classes, seed, mesh,
                            label=f"evaluate {train_set.method} {arch}",
                            checkpoint_dir=subfolder(checkpoint_dir, arch))
    logits = protocol.logits(model, params, eval_images)
    rows[arch] = classification_metrics(logits.argmax(-1), eval_labels, data.counts,
                                        protocol.shot_rule)
  return assemble_report(protocol, data, rows, train_set, split=split, start=start)


def split_arrays(data, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images, labels) of the balanced split an evaluation tests on: `test` or `validation`."""
  if split == "test":
    return data.test_images, data.test_labels
  if split == "validation":
    if not len(data.val_labels):
      raise errors.InputError("Validation requested but data.validation_per_class is 0; set it > 0.")
    return data.val_images, data.val_labels
  raise errors.InputError(f"split must be 'test' or 'validation', got {split!r}.")


def assemble_report(protocol: Protocol, data, rows: dict[str, dict], train_set: LabelledSet, *,
                    split: str, start: float, **extra) -> dict:
  """report.json's dict: the set's identity, the first architecture's metrics at top level, one
  row per architecture under `archs`, and any `extra` fields."""
  first_arch = next(iter(rows))
  return {
      "method": train_set.method, "dataset": data.name, "split": split,
      "imbalance_factor": data.imbalance_factor, "ipc": train_set.ipc,
      **rows[first_arch], "arch": first_arch, "archs": rows, **extra,
      "num_images": len(train_set), "lr": float(train_set.lr), "epochs": int(train_set.epochs),
      "num_models": int(protocol.num_models), "wall_seconds": time.time() - start,
  }


def write_report(workdir, report: dict, counts: np.ndarray, name: str = "report") -> None:
  """Writes `<name>.json` and the per-class accuracy chart `<name>_per_class.png`."""
  workdir = pathlib.Path(workdir)
  reporting.write_json(workdir / f"{name}.json", report)
  title = (f"{report['method']} on {report['dataset']} (IF {report['imbalance_factor']:g}, "
           f"IPC {report['ipc']}): {report['test_acc_mean']:.1f} +- {report['test_acc_std']:.1f}%")
  reporting.per_class_chart(np.asarray(report["per_class_acc"]) / 100.0, counts,
                            workdir / f"{name}_per_class.png", title,
                            stds=np.asarray(report["per_class_acc_std_over_models"]) / 100.0)


def format_report(report: dict) -> str:
  """One human line per architecture."""
  lines = []
  for arch, r in report["archs"].items():
    lines.append(f"{report['method']} [{arch}] {report.get('split', 'test')} "
                 f"{r['test_acc_mean']:.2f} +- "
                 f"{r['test_acc_std']:.2f}  many {r['many_acc']:.1f} medium {r['medium_acc']:.1f} "
                 f"few {r['few_acc']:.1f}  gap {r['head_tail_gap']:.1f}  "
                 f"KL {r['pred_kl_uniform']:.3f}")
  return "\n".join(lines)
