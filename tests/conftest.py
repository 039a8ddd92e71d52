"""Test setup: 4 fake CPU devices (multi-device tests need them; others use a 1-device mesh)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # pylint: disable=g-import-not-at-top

import pytest  # pylint: disable=g-import-not-at-top

SHARED_CIFAR = pathlib.Path(__file__).resolve().parents[2] / "shared/data/cifar10-train-jpeg.tar.gz"


@pytest.fixture
def digits_config(tmp_path):
  """The digits config shrunk for tests, writing caches under tmp_path."""
  from configs import digits_lt  # pylint: disable=g-import-not-at-top
  c = digits_lt.get_config()
  c.data.cache_dir = str(tmp_path / "cache")
  c.model.width = 8
  c.model.depth = 2
  return c
