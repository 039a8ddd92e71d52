"""Where labelled images come from: `digits`, `tfds`, `folder` and `listfile` sources.

Every source returns a `Pool`: uint8 images [N, H, W, C], int64 labels [N] and class names. Decoding
folders and list files is slow, so decoded arrays are cached as .npy under `data.cache_dir`, keyed by
the source's path, size, modification time and the target image size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pathlib
import tarfile

import numpy as np
from PIL import Image

from ltdd_jax import errors

SOURCES = ("digits", "tfds", "folder", "listfile")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
# The digits source reserves this many images per class as its balanced test split.
DIGITS_TEST_PER_CLASS = 50


@dataclasses.dataclass(frozen=True)
class Pool:
  """A labelled set of images.

  Attributes:
    images: [N, H, W, C] uint8.
    labels: [N] int64 in [0, C).
    class_names: C names, in label order.
  """
  images: np.ndarray
  labels: np.ndarray
  class_names: tuple[str, ...]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def load_pool(source: str, split: str, spec) -> Pool:
  """Loads one split ("train" or "test") of a source named in the data config.

  Args:
    source: one of SOURCES.
    split: "train" or "test"; `folder`/`listfile` read `data.train_path` / `data.test_path`.
    spec: the `dataset.DataSpec` (paths, image size, cache folder).

  Returns:
    A `Pool`.
  """
  if source == "digits":
    return _digits(split)
  if source == "tfds":
    return _tfds(spec.tfds_name, split)
  path = spec.train_path if split == "train" else spec.test_path
  if not path:
    raise errors.InputError(f"data.{split}_source={source!r} needs data.{split}_path (a folder, a .tar.gz "
                     "or a list file); it is empty.")
  path = os.path.expanduser(path)
  if not os.path.exists(path):
    raise errors.MissingError(f"data.{split}_path={path!r} does not exist. Point it at a folder of "
                            "<class>/<image> files, a .tar.gz of such a tree, or a list file.")
  if source == "folder":
    return _cached(lambda: _folder(path, spec.image_size), path, spec, "folder")
  if source == "listfile":
    root = os.path.expanduser(spec.image_root or os.path.dirname(path))
    return _cached(lambda: _listfile(path, root, spec.image_size), path, spec,
                   "listfile")
  raise errors.InputError(f"Unknown data source {source!r}; accepted: {SOURCES} (and 'holdout:K' for "
                   "data.test_source).")


def _digits(split: str) -> Pool:
  """scikit-learn's bundled 8x8 digits, split into train/test with a fixed per-class permutation."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  raw = datasets.load_digits()
  images = np.round(raw.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = raw.target.astype(np.int64)
  test = []
  for c in range(10):
    idx = np.flatnonzero(labels == c)
    test.append(idx[np.random.default_rng([1234, c]).permutation(len(idx))[:DIGITS_TEST_PER_CLASS]])
  is_test = np.zeros(len(labels), bool)
  is_test[np.concatenate(test)] = True
  keep = is_test if split == "test" else ~is_test
  return Pool(images[keep], labels[keep], tuple(str(c) for c in range(10)))


def check_tfds_reachable(builder, timeout: float = 5.0) -> None:
  """A tfds dataset not yet prepared is downloaded first: without a network that would hang for
  minutes, so fail fast when the dataset's host cannot be reached, and point at the alternatives."""
  from urllib.parse import urlparse  # pylint: disable=g-import-not-at-top
  import socket  # pylint: disable=g-import-not-at-top
  host = urlparse(builder.info.homepage or "").hostname
  if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
    return  # Behind a proxy a direct connection proves nothing; let tfds try.
  try:
    if not host:
      raise OSError("the dataset names no download host")
    socket.create_connection((host, 443), timeout=timeout).close()
  except OSError as e:
    raise errors.InputError(
        f"tfds has no prepared copy of {builder.name!r} in {builder.data_dir} and cannot download "
        f"it ({host or 'no host'}: {e}). Run once with network access, or read a local copy with "
        "source=folder (e.g. configs/cifar10_lt.py:source=folder --config.data.train_path=PATH, "
        "a folder or .tar.gz of <class>/<image> files).") from e


def _tfds(name: str, split: str) -> Pool:
  """A tfds image-classification dataset through `tfds.data_source` (no TensorFlow needed)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(name)
  if not builder.is_prepared():
    check_tfds_reachable(builder)
  source = tfds.data_source(name, split=split)
  records = [source[i] for i in range(len(source))]
  images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
  labels = np.asarray([int(r["label"]) for r in records], np.int64)
  names = tuple(source.dataset_info.features["label"].names)
  return Pool(images, labels, names)


def _decode(data: bytes | str, image_size: int, where: str) -> np.ndarray:
  """Decodes one image to [image_size, image_size, 3] uint8 (bilinear resize if needed)."""
  try:
    image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    image = image.convert("RGB")
  except Exception as e:  # PIL raises several types for corrupt files.
    raise errors.InputError(f"Cannot read image {where}: {e}. Remove or replace the file.") from e
  if image.size != (image_size, image_size):
    image = image.resize((image_size, image_size), Image.BILINEAR)
  return np.asarray(image, np.uint8)


def _by_class(items: list[tuple[str, str, object]], image_size: int, where: str) -> Pool:
  """Builds a Pool from (class_name, name, data) triples; classes in sorted name order."""
  if not items:
    raise errors.InputError(f"No images ({'/'.join(IMAGE_SUFFIXES)}) found in {where}; expected "
                     "<class>/<image> files.")
  names = tuple(sorted({c for c, _, _ in items}))
  index = {c: i for i, c in enumerate(names)}
  items = sorted(items, key=lambda t: (index[t[0]], t[1]))
  images = np.stack([_decode(d, image_size, n) for _, n, d in items])
  labels = np.asarray([index[c] for c, _, _ in items], np.int64)
  return Pool(images, labels, names)


def _folder(path: str, image_size: int) -> Pool:
  """root/<class>/<image> files, or a .tar(.gz) of such a tree (read without extracting)."""
  if os.path.isfile(path) and (path.endswith(".tar.gz") or path.endswith(".tgz")
                               or path.endswith(".tar")):
    items = []
    try:
      with tarfile.open(path) as archive:
        for member in archive:
          p = pathlib.PurePosixPath(member.name)
          if member.isfile() and p.suffix.lower() in IMAGE_SUFFIXES and len(p.parts) >= 2:
            items.append((p.parts[-2], member.name, archive.extractfile(member).read()))
    except (tarfile.TarError, EOFError, OSError) as e:
      raise errors.InputError(f"{path} is not a readable tar archive ({type(e).__name__}: {e}); "
                              "point data.train_path at a folder or a valid .tar.gz of "
                              "<class>/<image> files.") from e
    return _by_class(items, image_size, path)
  if not os.path.isdir(path):
    raise errors.InputError(f"{path!r} is neither a folder nor a .tar.gz archive of <class>/<image> files.")
  items = []
  for class_dir in sorted(pathlib.Path(path).iterdir()):
    if class_dir.is_dir():
      for f in sorted(class_dir.iterdir()):
        if f.suffix.lower() in IMAGE_SUFFIXES:
          items.append((class_dir.name, str(f), str(f)))
  return _by_class(items, image_size, path)


def _listfile(path: str, root: str, image_size: int) -> Pool:
  """ImageNet-LT style list: `relative/path label` lines, paths relative to `root`."""
  paths, labels = [], []
  with open(path) as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      parts = line.split()
      if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
        raise errors.InputError(f"{path}:{line_number}: expected 'relative/path label', got {line.strip()!r}.")
      paths.append(parts[0])
      labels.append(int(parts[1]))
  if not paths:
    raise errors.InputError(f"List file {path} has no 'relative/path label' lines.")
  labels = np.asarray(labels, np.int64)
  if labels.min() < 0:
    raise errors.InputError(f"List file {path} has negative labels; labels must be 0..C-1.")
  images = []
  for p in paths:
    full = os.path.join(root, p)
    if not os.path.exists(full):
      raise errors.MissingError(f"{path} lists {p!r}, but {full!r} does not exist; set "
                              "data.image_root to the folder the list is relative to.")
    images.append(_decode(full, image_size, full))
  num_classes = int(labels.max()) + 1
  return Pool(np.stack(images), labels, tuple(str(c) for c in range(num_classes)))


def _cached(load, path: str, spec, kind: str) -> Pool:
  """Returns `load()`, caching its arrays as .npy keyed by the source's identity."""
  stat = os.stat(path)
  key = json.dumps([kind, os.path.abspath(path), stat.st_size, stat.st_mtime_ns,
                    spec.image_size, spec.image_root])
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  cache = pathlib.Path(os.path.expanduser(spec.cache_dir)) / f"{kind}-{digest}"
  files = [cache / "images.npy", cache / "labels.npy", cache / "class_names.json"]
  if all(f.exists() for f in files):
    try:
      return Pool(np.load(files[0]), np.load(files[1]), tuple(json.loads(files[2].read_text())))
    except (ValueError, OSError):
      pass  # A half-written or corrupt cache is rebuilt below.
  pool = load()
  cache.mkdir(parents=True, exist_ok=True)
  for f, value in ((files[0], pool.images), (files[1], pool.labels)):
    tmp = f.with_suffix(".tmp.npy")
    np.save(tmp, value)
    os.replace(tmp, f)
  files[2].write_text(json.dumps(list(pool.class_names)))
  return pool
