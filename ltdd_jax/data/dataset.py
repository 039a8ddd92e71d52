"""The long-tailed dataset a run works on: sources -> splits -> LT subset -> fitted preprocessing."""

from __future__ import annotations

import dataclasses

import numpy as np

from ltdd_jax import errors
from ltdd_jax.data import longtail, preprocess, sources


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Which images a run works on and how they are prepared (`config.data`, DESIGN §1).

  Attributes:
    dataset: the name reports use.
    train_source, test_source: `digits | tfds | folder | listfile`; the test source may also be
      `holdout:K` (K images per class set aside from the training pool).
    tfds_name: the tfds dataset (tfds sources).
    train_path, test_path: a folder, .tar.gz or list file (folder and listfile sources).
    image_root: the folder a list file's paths are relative to ('' : the list's own folder).
    image_size: folder and listfile images are resized to this ...
    resize: ... by `squash` (both sides) or `center_crop` (the shorter side, then the centre).
    cache_dir: where decoded images and fitted preprocessing are cached.
    imbalance_factor, imbalance_profile, n_max: the long-tailed profile (`longtail`).
    validation_per_class: balanced validation images per class ...
    validation_from: ... set aside first (`pool`) or taken from what the long-tailed subset leaves
      over (`leftover`: `longtail.split_pool`).
    normalize, zca, zca_eps: preprocessing (`preprocess`).
    shot_rule: how classes split into many / medium / few (`longtail.shot_groups`).
  """
  dataset: str = "digits"
  train_source: str = "digits"
  test_source: str = "digits"
  tfds_name: str = "cifar10"
  train_path: str = ""
  test_path: str = ""
  image_root: str = ""
  image_size: int = 32
  resize: str = "squash"
  cache_dir: str = "~/.cache/ltdd_jax"
  imbalance_factor: float = 10.0
  imbalance_profile: str = "exp"
  n_max: int = 0
  validation_per_class: int = 0
  validation_from: str = "pool"
  normalize: bool = True
  zca: bool = False
  zca_eps: float = 0.1
  shot_rule: str = "thirds"


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Model-space arrays of every split plus what is needed to report and to draw.

  Attributes:
    train_images: [N, H, W, C] float32, the long-tailed training set (model space).
    train_labels: [N] int32.
    val_images, val_labels: balanced validation split (may be empty).
    test_images, test_labels: balanced test split.
    counts: [C] training images per class.
    class_names: C names.
    preprocessor: the fitted pixel <-> model-space map.
    name: dataset name for reports.
    imbalance_factor: the long-tail profile's n_max / n_min target, for reports.
    resized: images of the sources that had another size and were resized (`DataSpec.resize`).
    target_counts: [C] the long-tail profile's counts (`counts` differ where validation took
      training images: `longtail.Split.target_counts`).
    image_formats: the image file types the sources were read from (e.g. ('.jpg',)).
  """
  train_images: np.ndarray
  train_labels: np.ndarray
  val_images: np.ndarray
  val_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  counts: np.ndarray
  class_names: tuple[str, ...]
  preprocessor: preprocess.Preprocessor
  name: str
  imbalance_factor: float = 1.0
  resized: int = 0
  target_counts: np.ndarray | None = None
  image_formats: tuple[str, ...] = ()

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.train_images.shape[1:])


def parse_holdout(test_source: str) -> int:
  """'holdout:K' -> K; any other test source -> 0."""
  if not test_source.startswith("holdout"):
    return 0
  _, _, k = test_source.partition(":")
  if not k.isdigit() or int(k) < 1:
    raise errors.InputError(f"data.test_source={test_source!r}: expected 'holdout:K' with K >= 1 images "
                     "per class, e.g. 'holdout:1000'.")
  return int(k)


def load_dataset(spec: DataSpec, seed: int) -> Dataset:
  """Loads, splits and preprocesses the dataset a spec names (DESIGN §1).

  Args:
    spec: the `DataSpec`.
    seed: `config.seed`; fixes which images every split takes.

  Returns:
    A `Dataset`.
  """
  pool = sources.load_pool(spec.train_source, "train", spec)
  holdout = parse_holdout(spec.test_source)
  split = longtail.split_pool(
      pool.labels, pool.num_classes, spec.imbalance_factor,
      profile=spec.imbalance_profile, validation_per_class=spec.validation_per_class,
      holdout_per_class=holdout, n_max=spec.n_max, seed=seed,
      validation_from=spec.validation_from)
  pixels = lambda idx: pool.images[idx].astype(np.float32) / 255.0
  resized, formats = pool.resized, pool.formats
  if holdout:
    test_pixels, test_labels = pixels(split.holdout), pool.labels[split.holdout]
  else:
    test_pool = sources.load_pool(spec.test_source, "test", spec)
    if test_pool.num_classes != pool.num_classes or test_pool.images.shape[1:] != pool.images.shape[1:]:
      raise errors.InputError(
          f"Train source has {pool.num_classes} classes of {pool.images.shape[1:]} images but the "
          f"test source has {test_pool.num_classes} of {test_pool.images.shape[1:]}; they must match.")
    test_pixels, test_labels = test_pool.images.astype(np.float32) / 255.0, test_pool.labels
    resized = pool.resized + test_pool.resized
    formats = tuple(sorted({*pool.formats, *test_pool.formats}))
  pre = preprocess.cached_fit(pool.images[split.train], spec.cache_dir,
                              normalize=spec.normalize, zca=spec.zca,
                              zca_eps=spec.zca_eps)
  as_int = lambda x: np.asarray(x, np.int32)
  return Dataset(
      train_images=pre.apply(pixels(split.train)), train_labels=as_int(pool.labels[split.train]),
      val_images=pre.apply(pixels(split.validation)),
      val_labels=as_int(pool.labels[split.validation]),
      test_images=pre.apply(test_pixels), test_labels=as_int(test_labels),
      counts=split.counts, class_names=pool.class_names, preprocessor=pre,
      name=spec.dataset, imbalance_factor=float(spec.imbalance_factor), resized=resized,
      target_counts=split.target_counts, image_formats=formats)
