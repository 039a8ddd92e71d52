"""The evaluation protocol (DESIGN §5): T fresh networks trained on a labelled set, tested on a
balanced held-out split, with long-tail bias figures.

T networks train as one ensemble (`core.ensemble.train`): SGD momentum 0.9, weight decay 5e-4,
lr/10 at half the epochs, DSA on, soft-label cross-entropy when labels are soft. The reported
accuracy is the final one (never the best over test evaluations).

Long evaluations resume: given a folder, the ensemble's state is saved at most every
`checkpoint_seconds` and once trained, and continued from; epoch e draws from `fold_in(key, e)`, so
a resumed evaluation trains exactly the networks an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import pathlib
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from ltdd_jax import checkpoints, errors, models, seeds
from ltdd_jax.core import augment, ensemble, training
from ltdd_jax.evaluation import metrics, report as report_lib


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
    real: the images are real training images (a baseline's), not distilled.
  """
  images: np.ndarray
  labels: np.ndarray
  targets: np.ndarray
  lr: float
  epochs: int
  ipc: int | None
  method: str
  learned_lrs: dict = dataclasses.field(default_factory=dict)
  real: bool = False

  def __len__(self) -> int:
    return len(self.images)

  def subset(self, index: np.ndarray, targets: np.ndarray, lr: float) -> "LabelledSet":
    """The images `index` ([M] ints) with other targets ([M] or [M, K]) and lr: what one network
    of a two-stage classifier trains on."""
    return dataclasses.replace(self, images=self.images[index], labels=self.labels[index],
                               targets=targets, lr=lr)


@dataclasses.dataclass(frozen=True, eq=False)
class HeldOut:
  """A balanced split networks are tested on, and what a report says of its dataset.

  Attributes:
    images: [M, H, W, C] model-space images.
    labels: [M] their classes.
    split: `test` (reported numbers) or `validation` (model selection; never test).
    counts: [C] training images per class (many / medium / few).
    dataset: the dataset's name.
    imbalance_factor: its long-tail profile's IF.
  """
  images: np.ndarray
  labels: np.ndarray
  split: str
  counts: np.ndarray
  dataset: str
  imbalance_factor: float

  @classmethod
  def of(cls, data, split: str) -> "HeldOut":
    """The `test` or `validation` split of a `dataset.Dataset`."""
    if split == "test":
      images, labels = data.test_images, data.test_labels
    elif split == "validation":
      if not len(data.val_labels):
        raise errors.InputError("Validation requested but data.validation_per_class is 0; set it > 0.")
      images, labels = data.val_images, data.val_labels
    else:
      raise errors.InputError(f"split must be 'test' or 'validation', got {split!r}.")
    return cls(images, labels, split, np.asarray(data.counts), data.name, data.imbalance_factor)

  @property
  def num_classes(self) -> int:
    return len(self.counts)


STUDENT_SCHEDULES = ("step", "half_cosine")


def rded_batch_size(ipc: int | None, num_classes: int) -> int:
  """RDED's student batch by images per class: 10 at IPC 1, 50 at IPC 10, 100 at IPC 50, doubled
  at 100 classes and more (RDED: at 100 and 1,000). Other IPCs, which RDED leaves unset, take the
  next smaller published one's (50 for IPC 2-49; 100 for a whole set, IPC None); `recipe` caps it
  at the set's size, RDED at IPC x classes, which is the same for a distilled set."""
  batch = 10 if ipc is not None and ipc <= 1 else 50 if ipc is not None and ipc < 50 else 100
  return 2 * batch if num_classes >= 100 else batch


@dataclasses.dataclass(frozen=True)
class StudentRecipe:
  """How evaluation networks train under a teacher that relabels every batch, in place of the
  protocol's own SGD recipe (`evaluate.relabel_recipe=rded`: RDED's student, which SRe2L, EDC and
  the statistics-matching family evaluate with). Defaults are RDED's for ConvNet-3 on CIFAR-10.

  Attributes:
    optimizer: `adamw` or `sgd` (`training.TrainSpec.optimizer`).
    lr: the learning rate (the set's learned lr is not used).
    weight_decay: AdamW's decoupled decay (on kernels alone), or SGD's L2.
    schedule: `half_cosine` (`ensemble.Recipe.half_cosine`) or `step` (lr / 10 at half).
    batch_size: images per step; 0: RDED's by IPC (`rded_batch_size`).
    mix: `cutmix` (the teacher labels the mixed batch) or `none`.
    mix_beta: CutMix's Beta parameter.
    augment: the augmentation before mixing (RDED on 32x32 images: a horizontal flip, its
      RandomResizedCrop of scale (1, 1) keeping the whole image); None: none.
    temperature: the student's logits are divided by it in the loss; KD at temperature T when
      the `Teacher` has the same one (`run.specs.teacher_temperature` gives it this one).
  """
  optimizer: str = "adamw"
  lr: float = 0.001
  weight_decay: float = 0.01
  schedule: str = "half_cosine"
  batch_size: int = 0
  mix: str = "cutmix"
  mix_beta: float = 1.0
  augment: augment.DSASpec | None = augment.DSASpec(strategy="flip", siamese=False)
  temperature: float = 20.0

  def __post_init__(self):
    if self.schedule not in STUDENT_SCHEDULES:
      raise errors.InputError(f"Unknown student schedule {self.schedule!r}; accepted: "
                              f"{STUDENT_SCHEDULES}.")


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How evaluation networks train and test (DESIGN §5).

  Attributes:
    model: the `models.ModelSpec` evaluated (and the base of the cross-architecture rows).
    augment: DSA on every training batch (`evaluate.dsa`; None: off).
    seed: initialisation (seed) and batch-order (`seeds.EVALUATION_DATA`) seed.
    num_models: T networks per set.
    batch_size, momentum, weight_decay: their SGD.
    archs: architectures evaluated (the first one's figures are the report's top level).
    cross_arch_width: base width of architectures other than `model.name`.
    test_batch_size: images per forward pass when testing.
    shot_rule: how classes split into many / medium / few.
    checkpoint_seconds: least time between two saves of a resumable evaluation's state.
    relabel_student: how networks train when a teacher relabels their batches (`StudentRecipe`);
      None: this protocol's recipe, only the targets change.
  """
  model: models.ModelSpec
  augment: augment.DSASpec | None
  seed: int = 0
  num_models: int = 3
  batch_size: int = 256
  momentum: float = 0.9
  weight_decay: float = 5e-4
  archs: tuple[str, ...] = ("convnet",)
  cross_arch_width: int = 64
  test_batch_size: int = 1000
  shot_rule: str = "thirds"
  checkpoint_seconds: float = 300.0
  relabel_student: StudentRecipe | None = None

  def recipe(self, model, train_set: LabelledSet, balance: training.Balance = training.Balance(),
             student: StudentRecipe | None = None) -> ensemble.Recipe:
    """The `Recipe` of the networks evaluating `train_set`: batch capped at the set size, an epoch
    of as many images as the set has (whatever the sampling), lr / 10 at half the epochs; a
    `models.MultiHead` classifier's loss sums its heads' cross-entropies. With a `student`
    recipe, its optimiser, lr, schedule, batch, augmentation, mixing and temperature instead."""
    num_outputs = models.num_outputs(model)
    batch, lr = self.batch_size, train_set.lr
    training_fields = dict(weight_decay=self.weight_decay, augment=self.augment)
    schedule = {"decay_epoch": train_set.epochs // 2}
    if student is not None:
      batch = student.batch_size or rded_batch_size(train_set.ipc, num_outputs)
      lr = student.lr
      training_fields = dict(weight_decay=student.weight_decay, augment=student.augment,
                             optimizer=student.optimizer, mix=student.mix,
                             mix_beta=student.mix_beta, temperature=student.temperature)
      if student.schedule == "half_cosine":
        schedule = {"half_cosine": True}
    batch = min(batch, len(train_set))
    spec = training.TrainSpec(batch_size=batch,
                              steps_per_epoch=training.steps_per_epoch(len(train_set), batch),
                              momentum=self.momentum, num_classes=num_outputs,
                              sampling=balance.sampling or "instance", loss=balance.loss or "ce",
                              num_strata=balance.num_strata,
                              segments=models.head_segments(model), **training_fields)
    return ensemble.Recipe(
        model, spec, lr, train_set.epochs, self.num_models, init_seed=self.seed,
        keys=seeds.EpochKeys(seeds.offset(self.seed, seeds.EVALUATION_DATA)),
        ensemble_impl=self.model.ensemble_impl, **schedule)

  def student_under(self, teacher) -> StudentRecipe | None:
    """The student recipe networks train with under `teacher` (None: without one, or when the
    protocol keeps its own recipe)."""
    return self.relabel_student if teacher is not None else None

  def logits(self, model, params, images: np.ndarray) -> np.ndarray:
    """[T, N, C] logits of the T trained networks on `images`."""
    return ensemble.logits(model, params, images, self.test_batch_size, self.model.ensemble_impl)


@dataclasses.dataclass(frozen=True, eq=False)
class Teacher:
  """A frozen network that relabels every augmented training batch (`evaluate.protocol=relabel`):
  the evaluation networks fit softmax(teacher(x) / temperature) instead of the set's stored
  targets.

  Attributes:
    model: its Flax module.
    variables: its variables ({'params', 'batch_stats'} for a stored-statistics network).
    temperature: the softmax temperature.
  """
  model: Any
  variables: dict
  temperature: float = 1.0

  def digest(self) -> bytes:
    """SHA-256 of the teacher (module, variables, temperature): part of what an evaluation's
    saved state is fingerprinted with."""
    digest = hashlib.sha256(repr((self.model, self.temperature)).encode())
    for leaf in jax.tree.leaves(self.variables):
      digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return digest.digest()


@functools.lru_cache(maxsize=8)
def _teacher_apply(model):
  """jit(model.apply), built once per teacher module (Flax modules hash by value)."""
  return jax.jit(model.apply)


def teacher_on_set(teacher: Teacher, images: np.ndarray, labels: np.ndarray, num_classes: int,
                   batch_size: int = 1000) -> dict:
  """How a teacher labels a set's own images, unaugmented: whether relabelling keeps each image's
  class or moves it, which tells a set the teacher does not recognise from a recipe that does not
  suit it.

  Args:
    teacher: the relabelling `Teacher`.
    images: [N, H, W, C] the set's model-space images.
    labels: [N] the class each image stands for.
    num_classes: C.
    batch_size: images per forward pass.

  Returns:
    `teacher_set_acc` (% of images whose teacher argmax is their class), `teacher_set_per_class_acc`
    ([C] the same per class; 0 for a class without images), `teacher_set_pred_share` ([C] % of the
    images the teacher puts in each class) and `teacher_set_confidence` (mean top softmax
    probability, %, at temperature 1: how sure the teacher is, whatever temperature the students
    fit it at).
  """
  apply = _teacher_apply(teacher.model)
  logits = ensemble.batched(lambda x: apply(teacher.variables, x), images, batch_size)
  labels = np.asarray(labels).astype(np.int64)
  predicted = logits.argmax(-1)
  hit = predicted == labels
  counts = np.bincount(labels, minlength=num_classes)
  per_class = np.bincount(labels, weights=hit, minlength=num_classes) / np.maximum(counts, 1)
  probabilities = np.asarray(jax.nn.softmax(logits, axis=-1))
  return {
      "teacher_set_acc": 100.0 * float(hit.mean()),
      "teacher_set_per_class_acc": (100.0 * per_class).tolist(),
      "teacher_set_pred_share": (100.0 * np.bincount(predicted, minlength=num_classes)
                                 / len(labels)).tolist(),
      "teacher_set_confidence": 100.0 * float(probabilities.max(-1).mean()),
  }


class EvaluationDivergedError(errors.DivergedError):
  """The evaluation networks' loss stopped being finite (the set's lr is too high for them)."""


def hard_labels(targets: np.ndarray) -> np.ndarray:
  """[N] int labels of hard ([N]) or soft ([N, C]) targets."""
  targets = np.asarray(targets)
  return targets.astype(np.int32) if targets.ndim == 1 else targets.argmax(-1).astype(np.int32)


def subfolder(directory: pathlib.Path | None, name: str) -> pathlib.Path | None:
  """`directory / name`, or None when there is no directory (an evaluation that does not save)."""
  return None if directory is None else pathlib.Path(directory) / name


def set_fingerprint(train_set: LabelledSet, recipe: ensemble.Recipe, num_models: int,
                    teacher: Teacher | None = None) -> np.ndarray:
  """[32] uint8 SHA-256 of what an evaluation trains on (images, targets, lr, epochs, T) and how
  (the recipe: model, training spec with DSA, keys): a saved state whose fingerprint differs was
  made by another evaluation and is not resumed."""
  digest = hashlib.sha256()
  for array in (train_set.images, train_set.targets):
    array = np.ascontiguousarray(array)
    digest.update(f"{array.dtype}{array.shape}".encode())
    digest.update(array.tobytes())
  digest.update(repr((float(train_set.lr), int(train_set.epochs), int(num_models),
                      repr(recipe))).encode())
  if teacher is not None:
    digest.update(teacher.digest())
  return np.frombuffer(digest.digest(), np.uint8).copy()


class TimedStore:
  """An evaluation's resumable state: saved at most every `seconds` and once trained, in
  `directory`, beside the fingerprint of what it trains (`set_fingerprint`). A save of another
  evaluation, of other shapes, or one that cannot be read is deleted, not an error: an
  evaluation's saved state is only ever a shortcut."""

  def __init__(self, directory: pathlib.Path, fingerprint: np.ndarray, seconds: float):
    self.store = checkpoints.Checkpoints(directory, max_to_keep=1)
    self.fingerprint = fingerprint
    self.seconds = seconds
    self.last_save = time.time()

  def restore(self, states):
    step = self.store.latest_step()
    if step is None:
      return 0, states
    try:
      saved = self.store.restore(step, {"state": states, "fingerprint": self.fingerprint})
      reason = "it was saved by another evaluation"
    except checkpoints.CheckpointError as e:
      saved, reason = None, f"unreadable or of other shapes: {e}"
    if saved is not None and np.array_equal(saved["fingerprint"], self.fingerprint):
      return step, saved["state"]
    logging.warning("Evaluation state in %s not resumed (%s); training from epoch 0.",
                    self.store.directory, reason)
    self.store.delete(step)
    return 0, states

  def wants(self, done: int, last: bool) -> bool:
    return last or time.time() - self.last_save >= self.seconds

  def save(self, done: int, states) -> None:
    self.store.save(done, {"state": states, "fingerprint": self.fingerprint})
    self.last_save = time.time()

  def finish(self, states) -> None:
    self.store.close()


def train_networks(protocol: Protocol, model, train_set: LabelledSet, mesh, *,
                   balance: training.Balance = training.Balance(), strata: np.ndarray | None = None,
                   checkpoint_dir: pathlib.Path | None = None, label: str = "evaluate",
                   teacher: Teacher | None = None):
  """Trains `protocol.num_models` fresh networks of `model` on a labelled set; params [T, ...].

  Args:
    protocol: the evaluation `Protocol` (its seed initialises the networks).
    model: a Flax classifier with as many outputs as `train_set.targets` has classes.
    train_set: what they fit (`targets`), with its lr (divided by 10 at half the epochs) and epochs.
    mesh: device mesh (the network axis is sharded over it).
    balance: sampling / loss overrides (the protocol's: instance, ce).
    strata: [N] what class-balanced draws balance instead of the targets' classes
      (`training.over_classes`); None: the targets' classes.
    teacher: relabels every augmented batch (`Teacher`); None: the set's targets are fitted.
    checkpoint_dir: where the ensemble's state is saved (at most every
      `protocol.checkpoint_seconds`, and when trained) and resumed from; None: no saves.
    label: progress label.

  Raises:
    EvaluationDivergedError: at the first epoch whose loss, or whose state where it is saved or
      returned, is not finite (nothing non-finite is saved).
  """
  recipe = protocol.recipe(model, train_set, balance, protocol.student_under(teacher))
  if teacher is not None:
    recipe = dataclasses.replace(recipe, kernel=training.RelabelKernel(teacher.model,
                                                                       teacher.temperature))
  store = None
  if checkpoint_dir is not None:
    fingerprint = set_fingerprint(train_set, recipe, protocol.num_models, teacher)
    store = TimedStore(checkpoint_dir, fingerprint, protocol.checkpoint_seconds)

  def diverged(done, losses):
    return EvaluationDivergedError(
        f"{label}: evaluation training diverged at epoch {done} (loss per network "
        f"{losses.tolist()}); the learning rate {recipe.lr} is too high for this set.")

  data = {"images": train_set.images, "targets": train_set.targets,
          "labels": hard_labels(train_set.targets)}
  if strata is not None:
    data["strata"] = strata
  if teacher is not None:
    data["teacher"] = teacher.variables
  states = ensemble.train(recipe, ensemble.init_states(recipe, train_set.images.shape[1:]), data,
                          mesh, store=store, diverged=diverged, label=label)
  return states["params"]


def evaluate_set(protocol: Protocol, train_set: LabelledSet, held_out: HeldOut, mesh,
                 checkpoint_dir: pathlib.Path | None = None, teacher: Teacher | None = None) -> dict:
  """Trains on a labelled set with the protocol and tests on a balanced held-out split (`test` for
  reported numbers, `validation` for model selection and tuning: DESIGN §1, never test).

  Every architecture in `protocol.archs` is evaluated; the top-level fields are the first one's,
  and `archs` holds one row per architecture. With `checkpoint_dir`, each architecture's training
  resumes from `<checkpoint_dir>/<arch>`. With a `teacher`, every network fits its relabelling of
  each augmented batch (`evaluate.protocol=relabel`), and the report says how the teacher labels
  the set's own images (`teacher_on_set`).

  Returns:
    A report dict with `report.REPORT_FIELDS` and more (see `metrics.classification_metrics`).
  """
  start = time.time()
  rows = {}
  for arch in protocol.archs:
    width = None if arch == protocol.model.name else protocol.cross_arch_width
    model = models.make_classifier(protocol.model, held_out.num_classes, arch, width)
    params = train_networks(protocol, model, train_set, mesh,
                            checkpoint_dir=subfolder(checkpoint_dir, arch),
                            label=f"evaluate {train_set.method} {arch}", teacher=teacher)
    logits = protocol.logits(model, params, held_out.images)
    rows[arch] = metrics.classification_metrics(logits.argmax(-1), held_out.labels,
                                                held_out.counts, protocol.shot_rule)
  student = protocol.student_under(teacher)
  if student is not None:  # the lr they trained with
    train_set = dataclasses.replace(train_set, lr=student.lr)
  teacher_view = ({} if teacher is None else
                  teacher_on_set(teacher, train_set.images, train_set.labels, held_out.num_classes,
                                 protocol.test_batch_size))
  return report_lib.assemble_report(train_set, held_out, rows, protocol.num_models, start,
                                    **teacher_view)
