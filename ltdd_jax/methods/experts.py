"""Expert trajectories (DESIGN §3): K networks trained as one ensemble, every epoch saved.

Layout of an expert set under `<expert root>/<name>/`:
  trajectories/expert_KKK/epoch_EEEE/   one expert's parameters after one epoch (orbax), written as
                       the epoch finishes, so that distillation reads just the (expert, epoch)
                       pairs it samples;
  state/               the ensemble's optimiser state at the last finished epoch (what an
                       interrupted training resumes from with those epochs' parameters; removed
                       once the set is complete);
  run_spec.json        the config values the set depends on (written by the stage, checked on resume);
  meta.json            num_experts, epochs, classes, num_classes, label_map; written last, so its
                       presence means complete.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import shutil
from typing import Any

import jax
import numpy as np

from ltdd_jax import checkpoints, errors, models, reporting, seeds
from ltdd_jax.core import augment, ensemble, training

Balance = training.Balance


@dataclasses.dataclass(frozen=True)
class Labelling:
  """Which classes a set of experts learns and under which labels (recorded in meta.json).

  Attributes:
    num_classes: outputs of the experts' head.
    classes: the class subset trained on, relabelled 0..k-1 (per-group experts); () = all.
    label_map: [C] map of every class to a coarser label (group experts), or None.
  """
  num_classes: int
  classes: tuple[int, ...] = ()
  label_map: tuple[int, ...] | None = None

  def __post_init__(self):
    if self.classes and self.label_map is not None:
      raise errors.InputError("An expert labelling takes either a class subset or a label map, "
                              "not both.")

  def apply(self, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The training images these experts see and their labels: the class subset relabelled
    0..k-1 in the given order, or every image under the label map."""
    if self.classes:
      classes = list(self.classes)
      keep = np.isin(labels, classes)
      relabel = np.full(int(labels.max()) + 1, -1, np.int32)
      relabel[classes] = np.arange(len(classes), dtype=np.int32)
      return images[keep], relabel[labels[keep]]
    if self.label_map is not None:
      return images, np.asarray(self.label_map, np.int32)[labels]
    return images, labels

  def kept_classes(self, labels: np.ndarray) -> np.ndarray:
    """The dataset classes of the images `apply` keeps, in its order ([M] ints)."""
    labels = np.asarray(labels)
    return labels[np.isin(labels, list(self.classes))] if self.classes else labels


@dataclasses.dataclass(frozen=True)
class ExpertSpec:
  """How experts train (`config.experts` with the run's model, DSA and seed).

  Attributes:
    model: the `models.ModelSpec`.
    augment: DSA on every batch (`experts.dsa`; None: off).
    seed: initialisation and batch-order seed.
    num_experts, epochs, lr, momentum, weight_decay, batch_size: the trajectories' SGD.
    sampling: `instance` | `class_balanced`; loss: `ce` | `balanced_softmax`.
    balanced_epoch: a class-balanced epoch's length (`max_class`: largest class x C draws, LTDD's
      class-aware sampler; `dataset`: N draws).
    classifier_epochs, classifier_from_epoch, classifier_lr, classifier_sampling: LTDD's
      classifier-only re-training (its ED).
  """
  model: models.ModelSpec
  augment: augment.DSASpec | None
  seed: int = 0
  num_experts: int = 5
  epochs: int = 10
  lr: float = 0.01
  momentum: float = 0.0
  weight_decay: float = 0.0
  batch_size: int = 256
  sampling: str = "instance"
  loss: str = "ce"
  balanced_epoch: str = "max_class"
  classifier_epochs: int = 10
  classifier_from_epoch: int = -1
  classifier_lr: float = 0.01
  classifier_sampling: str = "class_balanced"


def train_spec(spec: ExpertSpec, labels: np.ndarray, num_classes: int, head_only: bool = False,
               balance: Balance = Balance()) -> training.TrainSpec:
  """The TrainSpec of (classifier-only, when head_only) expert training on a set with `labels`;
  `balance` overrides the sampling, loss and epoch length (the hierarchical stage-1 experts)."""
  sampling = balance.sampling or (spec.classifier_sampling if head_only else spec.sampling)
  size = training.epoch_size(labels, num_classes, sampling,
                             balance.balanced_epoch or spec.balanced_epoch)
  return training.TrainSpec(
      batch_size=spec.batch_size, steps_per_epoch=training.steps_per_epoch(size, spec.batch_size),
      momentum=spec.momentum, weight_decay=spec.weight_decay, num_classes=num_classes,
      sampling=sampling, loss=balance.loss or spec.loss, augment=spec.augment,
      head_only=head_only, num_strata=balance.num_strata)


def recipe(spec: ExpertSpec, labels: np.ndarray, num_classes: int,
           balance: Balance = Balance()) -> ensemble.Recipe:
  """The `Recipe` of the experts of a (labelled) training set with `labels`: the experts' lr and
  epochs; their initial parameters and epoch draws come from the run's seed."""
  model = models.make_classifier(spec.model, num_classes)
  return ensemble.Recipe(
      model, train_spec(spec, labels, num_classes, balance=balance), spec.lr, spec.epochs,
      spec.num_experts, init_seed=spec.seed,
      keys=seeds.EpochKeys(seeds.offset(spec.seed, seeds.EXPERT_DATA), first_fold=1),
      ensemble_impl=spec.model.ensemble_impl)


def classifier_recipe(spec: ExpertSpec, labels: np.ndarray, num_classes: int) -> ensemble.Recipe:
  """The `Recipe` of LTDD's classifier-only re-training (class-balanced by default) with its own
  lr, epochs and draws."""
  model = models.make_classifier(spec.model, num_classes)
  return ensemble.Recipe(
      model, train_spec(spec, labels, num_classes, head_only=True), spec.classifier_lr,
      spec.classifier_epochs, spec.num_experts, init_seed=spec.seed,
      keys=seeds.EpochKeys(seeds.offset(spec.seed, seeds.CLASSIFIER_EXPERT_DATA), first_fold=1),
      ensemble_impl=spec.model.ensemble_impl)


@dataclasses.dataclass(frozen=True)
class ExpertSet:
  """A finished set of expert trajectories on disk, and the network they are parameters of.

  Attributes:
    directory: the set's folder.
    num_experts, epochs: K experts, each saved at epochs 0..epochs.
    labelling: the classes and labels they learned.
    model: their Flax classifier.
    ensemble_impl: how several of them run in one program.
  """
  directory: pathlib.Path
  num_experts: int
  epochs: int
  labelling: Labelling
  model: Any
  ensemble_impl: str = "auto"

  @classmethod
  def open(cls, directory, model, ensemble_impl: str = "auto") -> "ExpertSet":
    """The finished set in `directory`, of classifiers `model`."""
    directory = pathlib.Path(directory)
    meta_path = directory / "meta.json"
    if not meta_path.exists():
      raise errors.MissingError(f"No finished expert set in {directory} (meta.json missing). Train "
                                "the experts first: python -m launch.experts --config=... --workdir=W")
    meta = json.loads(meta_path.read_text())
    label_map = meta.get("label_map")
    labelling = Labelling(meta["num_classes"], tuple(meta["classes"]),
                          None if label_map is None else tuple(label_map))
    if models.num_outputs(model) != labelling.num_classes:
      raise errors.InputError(f"{directory} holds experts with {labelling.num_classes} outputs, "
                              f"not {models.num_outputs(model)}.")
    return cls(directory, meta["num_experts"], meta["epochs"], labelling, model, ensemble_impl)

  @property
  def num_classes(self) -> int:
    return self.labelling.num_classes

  def _epoch(self, epoch: int) -> int:
    return self.epochs if epoch < 0 or epoch > self.epochs else epoch

  def load_epoch(self, k: int, epoch: int):
    """Parameters of expert k after `epoch` epochs (numpy); reads that epoch alone."""
    if not 0 <= k < self.num_experts:
      raise IndexError(f"expert {k} requested, the set has {self.num_experts}.")
    if not 0 <= epoch <= self.epochs:
      raise IndexError(f"epoch {epoch} of expert {k} requested, the set has 0..{self.epochs}.")
    return checkpoints.load_tree(trajectory_path(self.directory, k, epoch))

  def load(self, k: int):
    """Trajectory of expert k: params pytree with leaves [epochs + 1, ...] (numpy)."""
    return jax.tree.map(lambda *xs: np.stack(xs),
                        *[self.load_epoch(k, e) for e in range(self.epochs + 1)])

  def at_epoch(self, epoch: int = -1, experts=None):
    """Experts (`experts`: their indices; None: all) at one epoch (-1: the last), stacked:
    leaves [K, ...]."""
    epoch = self._epoch(epoch)
    chosen = range(self.num_experts) if experts is None else experts
    return jax.tree.map(lambda *xs: np.stack(xs), *[self.load_epoch(k, epoch) for k in chosen])

  def logits(self, images: np.ndarray, epoch: int = -1, experts=None,
             batch_size: int = 1000) -> np.ndarray:
    """[K, N, C] logits of the experts (`experts`: indices; None: all) at one epoch (-1: the
    last) on `images`, with the forward-pass convolution, `batch_size` images at a time."""
    return ensemble.logits(self.model, self.at_epoch(epoch, experts), images, batch_size,
                           self.ensemble_impl)

  def features(self, images: np.ndarray, expert: int = 0, epoch: int = -1,
               batch_size: int = 1000) -> np.ndarray:
    """[N, F] backbone features of `images` under one expert at one epoch (-1: the last)."""
    params = self.load_epoch(expert, self._epoch(epoch))
    backbone = models.for_inference(self.model).backbone
    fn = jax.jit(lambda p, x: backbone.apply({"params": p["backbone"]}, x))
    return np.concatenate([np.asarray(fn(params, images[i:i + batch_size]))
                           for i in range(0, len(images), batch_size)])


def trajectory_path(directory: pathlib.Path, k: int, epoch: int) -> pathlib.Path:
  """Where expert k's parameters after `epoch` epochs live."""
  return pathlib.Path(directory) / "trajectories" / f"expert_{k:03d}" / f"epoch_{epoch:04d}"


class TrajectoryReader:
  """(expert, epoch) -> parameters of an `ExpertSet`, read on demand with a small LRU cache.

  Distillation samples two epochs of one expert per iteration; reading just those keeps host
  memory at `cache_size` parameter trees whatever the number of experts and epochs (the `paper`
  profile's 100 x 51 width-128 epochs are 6.5 GB)."""

  def __init__(self, expert_set: ExpertSet, cache_size: int = 16):
    self.expert_set = expert_set
    self.cache_size = cache_size
    self._cache: collections.OrderedDict = collections.OrderedDict()

  @property
  def num_experts(self) -> int:
    return self.expert_set.num_experts

  @property
  def num_epochs(self) -> int:
    return self.expert_set.epochs

  def get(self, k: int, epoch: int):
    key = (k, epoch)
    if key in self._cache:
      self._cache.move_to_end(key)
      return self._cache[key]
    value = self.expert_set.load_epoch(k, epoch)
    self._cache[key] = value
    if len(self._cache) > self.cache_size:
      self._cache.popitem(last=False)
    return value


class TrajectoryStore:
  """The `ensemble.Store` of an expert set: after every epoch each expert's parameters go to their
  final place (`trajectory_path`) and the optimiser state to `state/`; a rerun resumes from the last
  epoch whose state was saved; once done, meta.json marks the set complete."""

  def __init__(self, directory: pathlib.Path, labelling: Labelling, num_experts: int,
               epochs: int):
    self.directory = pathlib.Path(directory)
    self.labelling = labelling
    self.num_experts = num_experts
    self.epochs = epochs
    self.state = checkpoints.Checkpoints(self.directory / "state", max_to_keep=1)

  def restore(self, states):
    step = self.state.latest_step()
    if step is None:  # Epoch 0 is the trajectories' first point.
      self.save(0, states)
      return 0, states
    opt_state = self.state.restore(step, {"opt_state": states["opt_state"]})["opt_state"]
    params = jax.tree.map(lambda *xs: np.stack(xs), *[
        checkpoints.load_tree(trajectory_path(self.directory, k, step))
        for k in range(self.num_experts)])
    if jax.tree.map(np.shape, params) != jax.tree.map(np.shape, states["params"]):
      raise checkpoints.CheckpointError(
          f"{self.directory} holds expert parameters of other shapes than this run's; delete it "
          "to train the experts again, or use another --workdir (or experts.directory).")
    return step, {"params": params, "opt_state": opt_state}

  def wants(self, done: int, last: bool) -> bool:
    return True

  def save(self, done: int, states) -> None:
    params = jax.tree.map(np.asarray, states["params"])
    for k in range(self.num_experts):
      checkpoints.save_tree(trajectory_path(self.directory, k, done),
                            jax.tree.map(lambda x, k=k: x[k], params))
    self.state.save(done, {"opt_state": states["opt_state"]})  # Written last: marks the epoch done.

  def finish(self, states) -> None:
    self.state.close()
    write_meta(self.directory, self.labelling, self.num_experts, self.epochs)
    shutil.rmtree(self.directory / "state")


def write_meta(directory, labelling: Labelling, num_experts: int, epochs: int) -> None:
  """Marks the expert set in `directory` complete: meta.json, written once every trajectory is."""
  reporting.write_json(pathlib.Path(directory) / "meta.json", {
      "num_experts": num_experts, "epochs": epochs, "classes": list(labelling.classes),
      "num_classes": labelling.num_classes,
      "label_map": None if labelling.label_map is None else list(labelling.label_map)})


def train_experts(recipe: ensemble.Recipe, labelling: Labelling, images: np.ndarray,
                  labels: np.ndarray, directory, mesh, init_params=None,
                  strata: np.ndarray | None = None) -> ExpertSet:
  """Trains (or resumes, or just opens) an expert set and saves every epoch's parameters.

  Args:
    recipe: how they train (`recipe`, `classifier_recipe`).
    labelling: which classes and labels they learn (meta.json records it).
    images, labels: their training set, already under `labelling` (`Labelling.apply`).
    directory: where the set lives (e.g. <expert root>/flat).
    mesh: device mesh; the expert axis is sharded over it.
    init_params: [K, ...] parameters to start from (classifier re-training); None: fresh.
    strata: [N] what class-balanced draws balance instead of `labels` (group experts drawing
      every class equally often: `training.over_classes`); None: the labels.

  Returns:
    The finished `ExpertSet`. Epoch e's draws are fold_in(seed, e), so a resumed training
    reproduces an uninterrupted one exactly.
  """
  directory = pathlib.Path(directory)
  if not (directory / "meta.json").exists():
    label = f"experts {directory.name}"

    def diverged(done, losses):
      return errors.DivergedError(
          f"{label}: training loss became {losses} at epoch {done}; lower the learning rate "
          f"(experts.lr). Epochs up to the last finite one are saved in {directory}.")

    states = ensemble.init_states(recipe, images.shape[1:], init_params)
    store = TrajectoryStore(directory, labelling, recipe.num_models, recipe.epochs)
    data = {"images": images, "targets": labels, "labels": labels}
    if strata is not None:
      data["strata"] = strata
    ensemble.train(recipe, states, data, mesh, store=store, diverged=diverged, label=label)
  return ExpertSet.open(directory, recipe.model, recipe.ensemble_impl)


def classifier_directory(expert_set: ExpertSet) -> pathlib.Path:
  """Where the classifier experts of a set live: beside it, as `<name>_classifier`."""
  return expert_set.directory.parent / f"{expert_set.directory.name}_classifier"


def train_classifier_experts(spec: ExpertSpec, expert_set: ExpertSet, images: np.ndarray,
                             labels: np.ndarray, mesh) -> ExpertSet:
  """LTDD's classifier experts: each expert's head re-trained alone (class-balanced by default)
  from its epoch `classifier_from_epoch`; the backbone stays frozen. `images`, `labels`: the
  whole LT training set (the set's labelling picks its images)."""
  if spec.classifier_epochs < 1:
    raise errors.InputError("Classifier-only experts need experts.classifier_epochs >= 1 (LTDD's ED "
                            "uses them); it is 0.")
  start = spec.classifier_from_epoch if spec.classifier_from_epoch >= 0 else expert_set.epochs
  if start > expert_set.epochs:
    raise errors.InputError(f"experts.classifier_from_epoch={start} but the experts have "
                            f"{expert_set.epochs} epochs.")
  images, labels = expert_set.labelling.apply(images, labels)
  return train_experts(classifier_recipe(spec, labels, expert_set.num_classes),
                       expert_set.labelling, images, labels, classifier_directory(expert_set),
                       mesh, init_params=expert_set.at_epoch(start))
