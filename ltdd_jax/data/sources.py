"""Where labelled images come from: `digits`, `tfds`, `folder` and `listfile` sources.

Every source returns a `Pool`: uint8 images [N, H, W, C], int64 labels [N] and class names. A
`folder` source is read as torchvision's ImageFolder reads it: every sub-folder of the root is a
class (sorted names = label order) holding its images at any depth, in sorted path order; a class
folder without images is an error, never a silent renumbering. Images of another size are resized
by `data.resize` (`squash`: both sides to the size; `center_crop`: the shorter side to the size,
then the centre). Decoding is slow, so decoded arrays are cached as .npy under `data.cache_dir`,
keyed by every file's relative path, size and modification time (a tarball's own), the image size
and the resize rule: any change inside the tree reads it again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pathlib
import tarfile
import tempfile

import numpy as np
from PIL import Image

from ltdd_jax import errors

SOURCES = ("digits", "tfds", "folder", "listfile")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
RESIZES = ("squash", "center_crop")
_LISTED = 10  # unreadable files named in one error
# The digits source reserves this many images per class as its balanced test split.
DIGITS_TEST_PER_CLASS = 50


@dataclasses.dataclass(frozen=True)
class Pool:
  """A labelled set of images.

  Attributes:
    images: [N, H, W, C] uint8.
    labels: [N] int64 in [0, C).
    class_names: C names, in label order.
    resized: how many images had another size and were resized (`data.resize`).
    formats: the image file suffixes read (e.g. ('.jpg',): a lossy copy; ('.png',): lossless);
      () for sources that are not files.
  """
  images: np.ndarray
  labels: np.ndarray
  class_names: tuple[str, ...]
  resized: int = 0
  formats: tuple[str, ...] = ()

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
    return _cached(lambda: _folder(path, spec.image_size, spec.resize), path, spec, "folder")
  if source == "listfile":
    root = os.path.expanduser(spec.image_root or os.path.dirname(path))
    return _cached(lambda: _listfile(path, root, spec.image_size, spec.resize), path, spec,
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


def _decode(data: bytes | str, image_size: int, resize: str) -> tuple[np.ndarray, bool]:
  """([image_size, image_size, 3] uint8, whether it was resized) of one image file or its bytes;
  raises the reader's error for a file that is not a readable image."""
  image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
  image = image.convert("RGB")
  if image.size == (image_size, image_size):
    return np.asarray(image, np.uint8), False
  if resize == "center_crop":  # The shorter side to the size, then the centre square.
    w, h = image.size
    scale = image_size / min(w, h)
    image = image.resize((max(image_size, round(w * scale)), max(image_size, round(h * scale))),
                         Image.BILINEAR)
    left, top = (image.size[0] - image_size) // 2, (image.size[1] - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
  elif resize == "squash":
    image = image.resize((image_size, image_size), Image.BILINEAR)
  else:
    raise errors.InputError(f"data.resize={resize!r}: accepted {', '.join(RESIZES)}.")
  return np.asarray(image, np.uint8), True


def _decode_all(sources: list[tuple[str, object]], image_size: int,
                resize: str) -> tuple[np.ndarray, int]:
  """(images [N, size, size, 3], number resized) of (where, file or bytes) pairs; every file that
  cannot be read is named in one error."""
  images, resized, bad = [], 0, []
  for where, data in sources:
    try:
      image, changed = _decode(data, image_size, resize)
    except errors.InputError:
      raise
    except Exception as e:  # PIL raises several types for corrupt files.
      bad.append(f"{where} ({type(e).__name__})")
      continue
    images.append(image)
    resized += changed
  if bad:
    more = f" and {len(bad) - _LISTED} more" if len(bad) > _LISTED else ""
    raise errors.InputError(f"{len(bad)} image file(s) cannot be read: {', '.join(bad[:_LISTED])}"
                            f"{more}. Remove or replace them.")
  return np.stack(images), resized


def _by_class(items: list[tuple[str, str, object]], class_names: list[str], image_size: int,
              resize: str, where: str) -> Pool:
  """A Pool from (class_name, relative path, file or bytes) triples: labels in sorted class-name
  order, images in sorted path order within a class. A class without images is an error."""
  names = tuple(sorted(class_names))
  if not names:
    raise errors.InputError(f"No class folders in {where}; expected <class>/<image> files (images "
                            f"{'/'.join(IMAGE_SUFFIXES)} at any depth under each class folder).")
  found = {c for c, _, _ in items}
  empty = [c for c in names if c not in found]
  if empty:
    raise errors.InputError(
        f"{where}: class folder(s) {', '.join(repr(c) for c in empty)} hold no images "
        f"({'/'.join(IMAGE_SUFFIXES)}); add images or remove the folder(s), so that the labels "
        "of the other classes stay what the folder names say.")
  index = {c: i for i, c in enumerate(names)}
  items = sorted(items, key=lambda t: (index[t[0]], t[1]))
  images, resized = _decode_all([(f"{where}/{rel}", data) for _, rel, data in items], image_size,
                                resize)
  labels = np.asarray([index[c] for c, _, _ in items], np.int64)
  return Pool(images, labels, names, resized, _formats(rel for _, rel, _ in items))


def _formats(paths) -> tuple[str, ...]:
  """The sorted lower-case suffixes of image file paths."""
  return tuple(sorted({pathlib.PurePosixPath(p).suffix.lower() for p in paths}))


def _is_image(name: str) -> bool:
  return pathlib.PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def _is_archive(path: str) -> bool:
  return os.path.isfile(path) and path.endswith((".tar.gz", ".tgz", ".tar"))


def _folder(path: str, image_size: int, resize: str = "squash") -> Pool:
  """root/<class>/**/<image> files, or a .tar(.gz) of such a tree (read without extracting; a
  tarball holding one top-level folder has its classes inside it)."""
  if _is_archive(path):
    try:
      with tarfile.open(path) as archive:
        members = [m for m in archive.getmembers() if m.isfile() or m.isdir()]
        parts = [pathlib.PurePosixPath(m.name).parts for m in members]
        # One top-level folder (a tarball of `train/`): the classes are inside it.
        depth = 1 if len({p[0] for p in parts}) == 1 and any(len(p) > 1 for p in parts) else 0
        classes = {p[depth] for p, m in zip(parts, members)
                   if len(p) > depth + 1 or (m.isdir() and len(p) == depth + 1)}
        items = [(p[depth], "/".join(p[depth:]), archive.extractfile(m).read())
                 for p, m in zip(parts, members)
                 if m.isfile() and len(p) > depth + 1 and _is_image(m.name)]
    except (tarfile.TarError, EOFError, OSError) as e:
      raise errors.InputError(f"{path} is not a readable tar archive ({type(e).__name__}: {e}); "
                              "point data.train_path at a folder or a valid .tar.gz of "
                              "<class>/<image> files.") from e
    return _by_class(items, sorted(classes), image_size, resize, path)
  if not os.path.isdir(path):
    raise errors.InputError(f"{path!r} is neither a folder nor a .tar.gz archive of <class>/<image> files.")
  root = pathlib.Path(path)
  classes = sorted(d.name for d in root.iterdir() if d.is_dir())
  items = [(c, f.relative_to(root).as_posix(), str(f)) for c in classes
           for f in sorted((root / c).rglob("*")) if f.is_file() and _is_image(f.name)]
  return _by_class(items, classes, image_size, resize, path)


def _listfile(path: str, root: str, image_size: int, resize: str = "squash") -> Pool:
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
  missing = [p for p in paths if not os.path.exists(os.path.join(root, p))]
  if missing:
    raise errors.MissingError(f"{path} lists {len(missing)} file(s) not under {root!r}, e.g. "
                              f"{missing[0]!r}; set data.image_root to the folder the list is "
                              "relative to.")
  images, resized = _decode_all([(p, os.path.join(root, p)) for p in paths], image_size, resize)
  num_classes = int(labels.max()) + 1
  return Pool(images, labels, tuple(str(c) for c in range(num_classes)), resized, _formats(paths))


def fingerprint(path: str) -> list:
  """What identifies a source's contents: a file's (or tarball's) size and modification time; for
  a folder, every file's relative path, size and modification time below it."""
  if os.path.isfile(path):
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]
  digest = hashlib.sha256()
  for f in sorted(pathlib.Path(path).rglob("*")):
    stat = f.stat()
    digest.update(f"{f.relative_to(path).as_posix()}|{f.is_dir()}|{stat.st_size}|"
                  f"{stat.st_mtime_ns}\n".encode())
  return [digest.hexdigest()]


def _cached(load, path: str, spec, kind: str) -> Pool:
  """Returns `load()`, caching its arrays as .npy keyed by the source's contents (`fingerprint`),
  the image size, the resize rule and the list root."""
  key = json.dumps([kind, os.path.abspath(path), fingerprint(path), spec.image_size,
                    spec.image_root, spec.resize])
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  cache = pathlib.Path(os.path.expanduser(spec.cache_dir)) / f"{kind}-{digest}"
  files = [cache / "images.npy", cache / "labels.npy", cache / "meta.json"]
  if all(f.exists() for f in files):
    try:
      meta = json.loads(files[2].read_text())
      return Pool(np.load(files[0]), np.load(files[1]), tuple(meta["class_names"]),
                  meta["resized"], tuple(meta["formats"]))
    except (ValueError, OSError, KeyError):
      pass  # A half-written or corrupt cache is rebuilt below.
  pool = load()
  cache.mkdir(parents=True, exist_ok=True)
  meta = json.dumps({"class_names": list(pool.class_names), "resized": pool.resized,
                     "formats": list(pool.formats)})
  for f, write in ((files[0], lambda out: np.save(out, pool.images)),
                   (files[1], lambda out: np.save(out, pool.labels)),
                   (files[2], lambda out: out.write(meta.encode()))):
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=f.suffix)  # Concurrent runs never collide.
    with os.fdopen(fd, "wb") as out:
      write(out)
    os.replace(tmp, f)
  return pool
