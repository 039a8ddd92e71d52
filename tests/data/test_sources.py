import io
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_CIFAR
from ltdd_jax import errors
from ltdd_jax.data import dataset, sources
from ltdd_jax.run import pipeline


def _data_config(tmp_path, **kw):
  return dataset.DataSpec(**{"image_size": 8, "cache_dir": str(tmp_path / "cache"), **kw})


def _write_tree(root, counts, size=8, suffix=".png"):
  rng = np.random.default_rng(0)
  for c, n in enumerate(counts):
    (root / f"class{c}").mkdir(parents=True)
    for i in range(n):
      Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8)).save(
          root / f"class{c}" / f"{i:03d}{suffix}")


def test_digits_splits_are_disjoint_and_fixed():
  train = sources.load_pool("digits", "train", None)
  test = sources.load_pool("digits", "test", None)
  assert train.images.shape[1:] == (8, 8, 1) and train.images.dtype == np.uint8
  assert len(test.labels) == 10 * sources.DIGITS_TEST_PER_CLASS
  assert len(train.labels) + len(test.labels) == 1797
  np.testing.assert_array_equal(sources.load_pool("digits", "test", None).images, test.images)


def test_folder_source_and_cache(tmp_path):
  _write_tree(tmp_path / "imgs", [5, 3, 2])
  cfg = _data_config(tmp_path, train_path=str(tmp_path / "imgs"))
  pool = sources.load_pool("folder", "train", cfg)
  assert pool.class_names == ("class0", "class1", "class2")
  np.testing.assert_array_equal(np.bincount(pool.labels), [5, 3, 2])
  assert pool.images.shape == (10, 8, 8, 3)
  assert any((tmp_path / "cache").rglob("images.npy"))
  decode = sources._folder
  sources._folder = lambda *a: (_ for _ in ()).throw(AssertionError("decoded again"))
  try:
    again = sources.load_pool("folder", "train", cfg)  # served from the .npy cache
  finally:
    sources._folder = decode
  np.testing.assert_array_equal(again.images, pool.images)
  assert again.class_names == pool.class_names


def test_folder_reads_as_image_folder_does(tmp_path):
  """Images at any depth under a class folder, in sorted path order; an empty class folder is an
  error naming it, never a renumbering of the classes after it."""
  _write_tree(tmp_path / "imgs", [4, 4, 2])
  nested = tmp_path / "imgs" / "class1" / "sub"
  nested.mkdir()
  for name in ("000.png", "001.png"):
    (tmp_path / "imgs" / "class1" / name).rename(nested / name)
  cfg = _data_config(tmp_path, train_path=str(tmp_path / "imgs"))
  pool = sources.load_pool("folder", "train", cfg)
  np.testing.assert_array_equal(np.bincount(pool.labels), [4, 4, 2])  # nested images counted
  (tmp_path / "imgs" / "class0b").mkdir()  # sorts between class0 and class1
  with pytest.raises(ValueError, match="class folder.*'class0b' hold no images"):
    sources.load_pool("folder", "train", cfg)


def test_cache_follows_every_file_in_the_tree(tmp_path):
  _write_tree(tmp_path / "imgs", [5, 3])
  cfg = _data_config(tmp_path, train_path=str(tmp_path / "imgs"))
  assert np.bincount(sources.load_pool("folder", "train", cfg).labels).tolist() == [5, 3]
  for name in ("000.png", "001.png"):  # deleted inside a class folder: the root's mtime stays
    (tmp_path / "imgs" / "class0" / name).unlink()
  assert np.bincount(sources.load_pool("folder", "train", cfg).labels).tolist() == [3, 3]


def test_mixed_sizes_follow_the_resize_rule(tmp_path):
  root = tmp_path / "imgs"
  _write_tree(root, [2, 2])
  Image.fromarray(np.zeros((8, 24, 3), np.uint8) + 255).save(root / "class1" / "wide.png")
  squash = sources.load_pool("folder", "train", _data_config(tmp_path, train_path=str(root)))
  crop = sources.load_pool("folder", "train", _data_config(tmp_path, train_path=str(root),
                                                           resize="center_crop"))
  assert squash.resized == crop.resized == 1 and squash.images.shape[1:] == (8, 8, 3)
  np.testing.assert_array_equal(squash.images[:4], crop.images[:4])  # the 8x8 images unchanged
  with pytest.raises(ValueError, match="data.resize='stretch'"):
    sources.load_pool("folder", "train", _data_config(tmp_path / "other", train_path=str(root),
                                                      resize="stretch"))


def test_tarball_equals_folder_and_resizes(tmp_path):
  _write_tree(tmp_path / "train", [4, 4], size=12, suffix=".jpg")
  archive = tmp_path / "data.tar.gz"
  with tarfile.open(archive, "w:gz") as tar:
    tar.add(tmp_path / "train", arcname="train")
  from_tar = sources.load_pool("folder", "train", _data_config(tmp_path, train_path=str(archive)))
  from_dir = sources.load_pool("folder", "train",
                               _data_config(tmp_path, train_path=str(tmp_path / "train")))
  assert from_tar.images.shape == (8, 8, 8, 3)
  np.testing.assert_array_equal(from_tar.images, from_dir.images)
  assert from_tar.class_names == from_dir.class_names


def test_listfile_source(tmp_path):
  _write_tree(tmp_path / "root", [2, 3])
  lines = [f"class{c}/{i:03d}.png {c}" for c, n in ((0, 2), (1, 3)) for i in range(n)]
  (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
  cfg = _data_config(tmp_path, train_path=str(tmp_path / "list.txt"),
                     image_root=str(tmp_path / "root"))
  pool = sources.load_pool("listfile", "train", cfg)
  np.testing.assert_array_equal(pool.labels, [0, 0, 1, 1, 1])
  (tmp_path / "bad.txt").write_text("class0/000.png zero\n")
  with pytest.raises(ValueError, match="expected 'relative/path label'"):
    sources.load_pool("listfile", "train", _data_config(tmp_path, train_path=str(tmp_path / "bad.txt"),
                                                        image_root=str(tmp_path / "root")))


def test_bad_inputs_fail_clearly(tmp_path):
  with pytest.raises(ValueError, match="Unknown data source 'hdf5'"):
    sources.load_pool("hdf5", "train", _data_config(tmp_path, train_path=str(tmp_path)))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    sources.load_pool("folder", "train", _data_config(tmp_path, train_path=str(tmp_path / "nope")))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="No class folders"):
    sources.load_pool("folder", "train", _data_config(tmp_path, train_path=str(tmp_path / "empty")))
  _write_tree(tmp_path / "broken", [2, 2])
  for name in ("x.png", "y.jpg"):
    (tmp_path / "broken" / "class1" / name).write_bytes(b"not an image")
  # Every unreadable file in one error, not one per rerun.
  with pytest.raises(ValueError, match=r"2 image file\(s\) cannot be read: .*x.png.*y.jpg"):
    sources.load_pool("folder", "train", _data_config(tmp_path, train_path=str(tmp_path / "broken")))
  with pytest.raises(ValueError, match="needs data.train_path"):
    sources.load_pool("folder", "train", _data_config(tmp_path))
  with pytest.raises(ValueError, match="holdout:K"):
    dataset.parse_holdout("holdout:x")


def test_tfds_source_offline(monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  checked = []
  monkeypatch.setattr(sources, "check_tfds_reachable", checked.append)  # mock data: no download
  with tfds.testing.mock_data(num_examples=20):
    pool = sources.load_pool("tfds", "train", dataset.DataSpec(tfds_name="cifar10"))
  assert pool.images.shape == (20, 32, 32, 3) and pool.images.dtype == np.uint8
  assert pool.num_classes == 10 and pool.labels.max() < 10
  assert [b.name for b in checked] == ["cifar10"], "an unprepared dataset is checked before download"


def test_tfds_without_network_fails_fast(monkeypatch):
  """No prepared copy and no network: one clear error in seconds, pointing at source=folder."""
  import socket  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  def unreachable(address, timeout=None):
    raise OSError(f"no route to {address[0]}")

  monkeypatch.setattr(socket, "create_connection", unreachable)
  start = time.time()
  with pytest.raises(errors.InputError, match="cannot download it.*source=folder"):
    sources.check_tfds_reachable(tfds.builder("cifar10"))
  assert time.time() - start < 10


def test_load_dataset_with_holdout(tmp_path, digits_config):
  digits_config.data.test_source = "holdout:20"
  data = pipeline.load_dataset(digits_config)
  np.testing.assert_array_equal(np.bincount(data.test_labels), [20] * 10)
  np.testing.assert_array_equal(np.bincount(data.val_labels), [10] * 10)
  np.testing.assert_array_equal(np.bincount(data.train_labels, minlength=10), data.counts)
  assert data.train_images.dtype == np.float32


@pytest.mark.skipif(not SHARED_CIFAR.exists(), reason=f"shared CIFAR-10 JPEG tarball not found at "
                    f"{SHARED_CIFAR} (only present beside a developer/CI checkout)")
def test_shared_cifar10_tarball(tmp_path):
  cfg = _data_config(tmp_path, train_path=str(SHARED_CIFAR), image_size=32)
  pool = sources.load_pool("folder", "train", cfg)
  assert pool.images.shape == (50000, 32, 32, 3)
  np.testing.assert_array_equal(np.bincount(pool.labels), [5000] * 10)
  assert len(pool.class_names) == 10
  start = time.time()
  again = sources.load_pool("folder", "train", cfg)
  assert time.time() - start < 2.0, "a cached load of CIFAR-sized data should take under 2 s"
  assert again.images.shape == pool.images.shape
  # The real test split beside it: 1,000 per class, the same classes, no training image in it.
  test_path = SHARED_CIFAR.with_name("cifar10-test-jpeg.tar.gz")
  test = sources.load_pool("folder", "test", _data_config(tmp_path, test_path=str(test_path),
                                                          image_size=32))
  assert test.class_names == pool.class_names and test.formats == (".jpg",)
  np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
  assert not {x.tobytes() for x in test.images} & {x.tobytes() for x in pool.images}


def _tarball(path, top, files):
  """A .tar.gz of `top/<class>/<name>` PNGs from {(class, name): [H, W, 3] uint8}."""
  with tarfile.open(path, "w:gz") as archive:
    for (cls, name), image in files.items():
      buffer = io.BytesIO()
      Image.fromarray(image).save(buffer, format="PNG")
      info = tarfile.TarInfo(f"{top}/{cls}/{name}")
      info.size = buffer.tell()
      buffer.seek(0)
      archive.addfile(info, buffer)


def test_cifar100_layout_keeps_same_named_files_of_two_classes_apart(tmp_path):
  """CIFAR-100 files two classes (`baby`, `girl`) under one name: keyed by (class, file), both
  are kept, each under its own label, in sorted class-name order."""
  rng = np.random.default_rng(0)
  files = {(c, f"{c}_{i}.png"): rng.integers(0, 255, (8, 8, 3), np.uint8)
           for c in ("apple", "baby", "girl") for i in range(4)}
  files[("baby", "baby_s_000333.png")] = rng.integers(0, 255, (8, 8, 3), np.uint8)
  files[("girl", "baby_s_000333.png")] = rng.integers(0, 255, (8, 8, 3), np.uint8)
  _tarball(tmp_path / "train.tar.gz", "train", files)
  pool = sources.load_pool("folder", "train", _data_config(tmp_path,
                                                           train_path=str(tmp_path / "train.tar.gz")))
  assert pool.class_names == ("apple", "baby", "girl") and pool.formats == (".png",)
  np.testing.assert_array_equal(np.bincount(pool.labels), [4, 5, 5])
  for label, cls in ((1, "baby"), (2, "girl")):
    matches = [i for i in range(len(pool.labels))
               if np.array_equal(pool.images[i], files[(cls, "baby_s_000333.png")])]
    assert len(matches) == 1 and pool.labels[matches[0]] == label


def test_real_test_split_is_the_test_files_and_never_a_training_image(tmp_path):
  rng = np.random.default_rng(1)
  train = {(c, f"{i:04d}.png"): rng.integers(0, 255, (8, 8, 3), np.uint8)
           for c in ("a", "b", "c") for i in range(40)}
  test = {(c, f"{i:04d}.png"): rng.integers(0, 255, (8, 8, 3), np.uint8)
          for c in ("a", "b", "c") for i in range(6)}
  _tarball(tmp_path / "train.tar.gz", "train", train)
  _tarball(tmp_path / "test.tar.gz", "test", test)
  spec = _data_config(tmp_path, train_source="folder", train_path=str(tmp_path / "train.tar.gz"),
                      test_source="folder", test_path=str(tmp_path / "test.tar.gz"),
                      imbalance_factor=4.0, validation_per_class=5, validation_from="leftover",
                      normalize=False)
  data = dataset.load_dataset(spec, seed=0)
  np.testing.assert_array_equal(np.bincount(data.test_labels), [6, 6, 6])
  np.testing.assert_array_equal(data.counts, [35, 20, 10])  # n_max 40, the first gives 5 up
  np.testing.assert_array_equal(data.target_counts, [40, 20, 10])
  pixels = lambda x: np.round(data.preprocessor.invert(x) * 255).astype(np.uint8)
  key = lambda images: {image.tobytes() for image in images}
  assert key(pixels(data.test_images)) == key(test.values())
  seen = key(pixels(np.concatenate([data.train_images, data.val_images])))
  assert seen <= key(train.values()) and not seen & key(test.values())
