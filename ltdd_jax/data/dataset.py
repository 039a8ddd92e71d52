"""The long-tailed dataset a run works on: sources -> splits -> LT subset -> fitted preprocessing."""

from __future__ import annotations

import dataclasses

import numpy as np

from ltdd_jax import errors
from ltdd_jax.data import longtail, preprocess, sources


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


def load_dataset(data_config, seed: int) -> Dataset:
  """Loads, splits and preprocesses the dataset a config names (DESIGN §1).

  Args:
    data_config: `config.data`.
    seed: `config.seed`; fixes which images every split takes.

  Returns:
    A `Dataset`.
  """
  pool = sources.load_pool(data_config.train_source, "train", data_config)
  holdout = parse_holdout(data_config.test_source)
  split = longtail.split_pool(
      pool.labels, pool.num_classes, data_config.imbalance_factor,
      profile=data_config.imbalance_profile, validation_per_class=data_config.validation_per_class,
      holdout_per_class=holdout, n_max=data_config.n_max, seed=seed)
  pixels = lambda idx: pool.images[idx].astype(np.float32) / 255.0
  if holdout:
    test_pixels, test_labels = pixels(split.holdout), pool.labels[split.holdout]
  else:
    test_pool = sources.load_pool(data_config.test_source, "test", data_config)
    if test_pool.num_classes != pool.num_classes or test_pool.images.shape[1:] != pool.images.shape[1:]:
      raise errors.InputError(
          f"Train source has {pool.num_classes} classes of {pool.images.shape[1:]} images but the "
          f"test source has {test_pool.num_classes} of {test_pool.images.shape[1:]}; they must match.")
    test_pixels, test_labels = test_pool.images.astype(np.float32) / 255.0, test_pool.labels
  pre = preprocess.cached_fit(pool.images[split.train], data_config.cache_dir,
                              normalize=data_config.normalize, zca=data_config.zca,
                              zca_eps=data_config.zca_eps)
  as_int = lambda x: np.asarray(x, np.int32)
  return Dataset(
      train_images=pre.apply(pixels(split.train)), train_labels=as_int(pool.labels[split.train]),
      val_images=pre.apply(pixels(split.validation)),
      val_labels=as_int(pool.labels[split.validation]),
      test_images=pre.apply(test_pixels), test_labels=as_int(test_labels),
      counts=split.counts, class_names=pool.class_names, preprocessor=pre,
      name=data_config.dataset, imbalance_factor=float(data_config.imbalance_factor))
