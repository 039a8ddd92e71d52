"""Expert trajectories (DESIGN §3): K networks trained as one vmapped program, saved every epoch.

Layout of an expert set under `<workdir>/experts/<name>/`:
  epochs/              orbax checkpoints of the whole ensemble {params, velocity} per finished epoch
                       (what an interrupted run resumes from; removed once trajectories are written);
  trajectories/expert_KKK/epoch_EEEE/   one expert's parameters after one epoch (orbax), so that
                       distillation reads just the (expert, epoch) pairs it samples;
  run_spec.json        the config values the set depends on (checked on resume);
  meta.json            num_experts, epochs, classes, layout; written last, so its presence means
                       complete.
Sets written before the per-epoch layout (`trajectories/expert_KKK/` holding every epoch in one
tree) are still read.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ltdd_jax import checkpoints, errors, models, parallel, reporting, resume, training


def subset_classes(images: np.ndarray, labels: np.ndarray, classes) -> tuple[np.ndarray, np.ndarray]:
  """Keeps the images of `classes` and relabels them 0..k-1 in the given order. () keeps all."""
  if not classes:
    return images, labels
  classes = list(classes)
  keep = np.isin(labels, classes)
  relabel = np.full(int(labels.max()) + 1, -1, np.int32)
  relabel[classes] = np.arange(len(classes), dtype=np.int32)
  return images[keep], relabel[labels[keep]]


@dataclasses.dataclass(frozen=True)
class ExpertSet:
  """A finished set of expert trajectories on disk."""
  directory: pathlib.Path
  num_experts: int
  epochs: int
  classes: tuple[int, ...]
  num_classes: int
  label_map: tuple[int, ...] | None = None
  layout: str = "per_epoch"

  @classmethod
  def open(cls, directory) -> "ExpertSet":
    directory = pathlib.Path(directory)
    meta_path = directory / "meta.json"
    if not meta_path.exists():
      raise errors.MissingError(f"No finished expert set in {directory} (meta.json missing). Train "
                                "the experts first: python -m launch.buffer --config=... --workdir=W")
    meta = json.loads(meta_path.read_text())
    label_map = meta.get("label_map")
    return cls(directory, meta["num_experts"], meta["epochs"], tuple(meta["classes"]),
               meta["num_classes"], None if label_map is None else tuple(label_map),
               meta.get("layout", "stacked"))

  def _check(self, k: int, epoch: int | None = None) -> None:
    if not 0 <= k < self.num_experts:
      raise IndexError(f"expert {k} requested, the set has {self.num_experts}.")
    if epoch is not None and not 0 <= epoch <= self.epochs:
      raise IndexError(f"epoch {epoch} of expert {k} requested, the set has 0..{self.epochs}.")

  def load_epoch(self, k: int, epoch: int):
    """Parameters of expert k after `epoch` epochs (numpy); reads that epoch alone."""
    self._check(k, epoch)
    if self.layout == "stacked":  # One tree per expert: keep the last two read.
      return jax.tree.map(lambda x: x[epoch], _stacked_trajectory(self.directory, k))
    return checkpoints.load_tree(self.directory / "trajectories" / f"expert_{k:03d}" /
                                 f"epoch_{epoch:04d}")

  def load(self, k: int):
    """Trajectory of expert k: params pytree with leaves [epochs + 1, ...] (numpy)."""
    self._check(k)
    if self.layout == "stacked":
      return checkpoints.load_tree(self.directory / "trajectories" / f"expert_{k:03d}")
    return jax.tree.map(lambda *xs: np.stack(xs),
                        *[self.load_epoch(k, e) for e in range(self.epochs + 1)])

  def load_all(self):
    """Every trajectory stacked: leaves [K, epochs + 1, ...] (small sets and tests only)."""
    return jax.tree.map(lambda *xs: np.stack(xs), *[self.load(k) for k in range(self.num_experts)])

  def at_epoch(self, epoch: int = -1):
    """Every expert at one epoch (-1: the last), stacked: leaves [K, ...]."""
    epoch = self.epochs if epoch < 0 or epoch > self.epochs else epoch
    return jax.tree.map(lambda *xs: np.stack(xs),
                        *[self.load_epoch(k, epoch) for k in range(self.num_experts)])


@functools.lru_cache(maxsize=2)
def _stacked_trajectory(directory: pathlib.Path, k: int):
  """Expert k of a set in the earlier stacked layout (every epoch in one tree)."""
  return checkpoints.load_tree(directory / "trajectories" / f"expert_{k:03d}")


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


class StackedTrajectories:
  """The `TrajectoryReader` interface over trajectories already in memory ([K, E+1, ...])."""

  def __init__(self, stacked):
    self.stacked = stacked

  @property
  def num_experts(self) -> int:
    return jax.tree.leaves(self.stacked)[0].shape[0]

  @property
  def num_epochs(self) -> int:
    return jax.tree.leaves(self.stacked)[0].shape[1] - 1

  def get(self, k: int, epoch: int):
    return jax.tree.map(lambda x: x[k, epoch], self.stacked)


def make_epoch_fn(apply_fn, spec: training.TrainSpec, dsa_config, num_classes: int,
                  ensemble_impl: str):
  """A jitted function running one epoch for every network of an ensemble (stacked on axis 0)."""
  one = functools.partial(training.train_epoch, apply_fn, spec, dsa_config,
                          num_classes=num_classes)
  ensemble = training.over_ensemble(one, (0, 0, 0, None, None, None, None), ensemble_impl)
  return jax.jit(ensemble)


@dataclasses.dataclass(frozen=True, eq=False)
class Recipe:
  """How an ensemble of experts trains: model, per-step spec, DSA, schedule and seed.

  Attributes:
    model: the Flax classifier.
    train: the `training.TrainSpec` of every step.
    dsa: `config.dsa` (used when `train.dsa`).
    lr: constant learning rate.
    epochs: epochs to train (every one is saved).
    seed: the PRNG seed of epoch e's draws is fold_in(seed, e).
    ensemble_impl: how the K networks run in one program (`training.over_ensemble`).
  """
  model: Any
  train: training.TrainSpec
  dsa: Any
  lr: float
  epochs: int
  seed: int
  ensemble_impl: str = "auto"


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


def train_trajectories(directory, recipe: Recipe, images, labels, labelling: Labelling,
                       init_params, mesh, label: str = "experts") -> ExpertSet:
  """Trains an ensemble from `init_params` ([K, ...]) and saves every epoch's parameters.

  Resumes from the last finished epoch found under `directory/epochs`; returns at once if the set
  is already complete. The PRNG key of epoch e is fold_in(recipe.seed, e), so a resumed run
  reproduces an uninterrupted one exactly. `labels` are the training labels after `labelling`
  (subset relabelled, or mapped to groups).
  """
  directory = pathlib.Path(directory)
  if (directory / "meta.json").exists():
    return ExpertSet.open(directory)
  num_models = jax.tree.leaves(init_params)[0].shape[0]
  epoch_fn = make_epoch_fn(training.make_apply(recipe.model), recipe.train, recipe.dsa,
                           labelling.num_classes, recipe.ensemble_impl)
  state = {"params": init_params, "velocity": jax.tree.map(np.zeros_like, init_params)}
  store = checkpoints.Checkpoints(directory / "epochs", max_to_keep=None)
  start = store.latest_step()
  if start is None:
    store.save(0, state)
    start = 0
  else:
    state = store.restore(start, state)
  state = parallel.shard_leading(state, mesh)
  data = parallel.replicate((jnp.asarray(images), jnp.asarray(labels)), mesh)
  base = jax.random.key(recipe.seed)
  progress = reporting.Progress(label, recipe.epochs, start)
  for epoch in range(start + 1, recipe.epochs + 1):
    keys = jax.random.split(jax.random.fold_in(base, epoch), num_models)
    images_d, labels_d = data
    params, velocity, loss = epoch_fn(state["params"], state["velocity"], keys,
                                      jnp.float32(recipe.lr), images_d, labels_d, labels_d)
    loss = np.asarray(loss)
    if not np.isfinite(loss).all():
      raise errors.DivergedError(f"{label}: training loss became {loss} at epoch {epoch}; lower the "
                               "learning rate (experts.lr). Epochs up to the last finite one are "
                               f"saved in {directory / 'epochs'}.")
    state = {"params": params, "velocity": velocity}
    store.save(epoch, state)
    progress.update(epoch, f"loss {loss.mean():.3f}")
  store.close()
  _write_trajectories(directory, recipe.epochs, num_models, labelling)
  return ExpertSet.open(directory)


def _write_trajectories(directory: pathlib.Path, epochs: int, num_models: int,
                        labelling: Labelling) -> None:
  """Writes every (expert, epoch) of the per-epoch ensemble checkpoints as its own tree, one
  epoch in memory at a time, then meta.json."""
  store = checkpoints.Checkpoints(directory / "epochs", max_to_keep=None)
  for e in range(epochs + 1):
    params = store.restore_any(e)["params"]
    for k in range(num_models):
      checkpoints.save_tree(directory / "trajectories" / f"expert_{k:03d}" / f"epoch_{e:04d}",
                            jax.tree.map(lambda x, k=k: x[k], params))
  store.close()
  reporting.write_json(directory / "meta.json", {
      "num_experts": num_models, "epochs": epochs, "classes": list(labelling.classes),
      "num_classes": labelling.num_classes, "layout": "per_epoch",
      "label_map": None if labelling.label_map is None else list(labelling.label_map)})
  shutil.rmtree(directory / "epochs")


@dataclasses.dataclass(frozen=True)
class Balance:
  """How a set of experts counters imbalance: `sampling` (instance | class_balanced), `loss`
  (ce | balanced_softmax) and, for class-balanced sampling, the epoch length (`balanced_epoch`:
  max_class | dataset). None keeps the `config.experts` value."""
  sampling: str | None = None
  loss: str | None = None
  balanced_epoch: str | None = None


def expert_spec(experts_config, labels: np.ndarray, num_classes: int, head_only: bool = False,
                balance: Balance = Balance()) -> training.TrainSpec:
  """The TrainSpec of (classifier-only, when head_only) expert training from `config.experts` on
  a training set with `labels`; a class-balanced epoch's length follows `experts.balanced_epoch`.
  `balance` overrides the sampling, loss and epoch length (the hierarchical stage-1 experts)."""
  sampling = experts_config.classifier_sampling if head_only else experts_config.sampling
  sampling = balance.sampling or sampling
  size = training.epoch_size(labels, num_classes, sampling,
                             balance.balanced_epoch or experts_config.balanced_epoch)
  return training.TrainSpec(
      batch_size=experts_config.batch_size,
      steps_per_epoch=training.steps_per_epoch(size, experts_config.batch_size),
      momentum=experts_config.momentum, weight_decay=experts_config.weight_decay,
      sampling=sampling, loss=balance.loss or experts_config.loss, dsa=experts_config.dsa,
      head_only=head_only)


def recipe(config, model, train: training.TrainSpec, classifier: bool = False) -> Recipe:
  """The `Recipe` of the experts `config.experts` asks for (`classifier`: LTDD's classifier-only
  re-training, with its own lr, epochs and seed)."""
  cfg = config.experts
  if classifier:
    return Recipe(model, train, config.dsa, cfg.classifier_lr, cfg.classifier_epochs,
                  config.seed + 1, config.model.ensemble_impl)
  return Recipe(model, train, config.dsa, cfg.lr, cfg.epochs, config.seed,
                config.model.ensemble_impl)


def train_experts(config, data, directory, mesh, classes=(),
                  label_map: np.ndarray | None = None, balance: Balance = Balance()) -> ExpertSet:
  """Trains (or resumes, or just opens) the expert set a config asks for on `data`'s LT train set.

  Args:
    config: the whole config (experts, model, dsa, seed).
    data: a `Dataset`.
    directory: where the set lives (e.g. <workdir>/experts/flat).
    mesh: device mesh; the expert axis is sharded over it.
    classes: class subset, relabelled 0..k-1 (per-group experts); () = all classes.
    label_map: optional [C] map of every class to a coarser label (group experts: class -> group);
      not combined with `classes`.
    balance: sampling / loss overrides (`Balance`), e.g. group-balanced group experts.

  Returns:
    The finished `ExpertSet`.
  """
  resume.claim(config, directory, "experts")
  cfg = config.experts
  images, labels = subset_classes(data.train_images, data.train_labels, classes)
  num_classes = len(classes) if classes else data.num_classes
  if label_map is not None:
    if classes:
      raise errors.InputError("train_experts takes either a class subset or a label map, not both.")
    labels = np.asarray(label_map, np.int32)[labels]
    num_classes = int(np.max(label_map)) + 1
  model = models.make_classifier(config.model, num_classes)
  init = training.init_ensemble(model, jax.random.key(config.seed), cfg.num_experts,
                                data.image_shape)
  spec = expert_spec(cfg, labels, num_classes, balance=balance)
  labelling = Labelling(num_classes, tuple(int(c) for c in classes),
                        None if label_map is None else tuple(int(x) for x in label_map))
  return train_trajectories(directory, recipe(config, model, spec), images, labels, labelling,
                            init, mesh, f"experts {pathlib.Path(directory).name}")


def classifier_experts(config, data, experts: ExpertSet, mesh) -> ExpertSet:
  """LTDD's classifier experts: each expert's head re-trained alone (class-balanced by default)
  from its epoch `experts.classifier_from_epoch`; the backbone stays frozen. Saved beside the
  experts as `<name>_classifier`."""
  cfg = config.experts
  if cfg.classifier_epochs < 1:
    raise errors.InputError("Classifier-only experts need experts.classifier_epochs >= 1 (LTDD's ED uses "
                     "them); it is 0.")
  images, labels = subset_classes(data.train_images, data.train_labels, experts.classes)
  if experts.label_map is not None:
    labels = np.asarray(experts.label_map, np.int32)[labels]
  start = cfg.classifier_from_epoch if cfg.classifier_from_epoch >= 0 else experts.epochs
  if start > experts.epochs:
    raise errors.InputError(f"experts.classifier_from_epoch={start} but the experts have "
                     f"{experts.epochs} epochs.")
  init = experts.at_epoch(start)
  model = models.make_classifier(config.model, experts.num_classes)
  spec = expert_spec(cfg, labels, experts.num_classes, head_only=True)
  directory = experts.directory.parent / f"{experts.directory.name}_classifier"
  resume.claim(config, directory, "experts", classifier=True)
  labelling = Labelling(experts.num_classes, experts.classes, experts.label_map)
  return train_trajectories(directory, recipe(config, model, spec, classifier=True), images,
                            labels, labelling, init, mesh, directory.name)
