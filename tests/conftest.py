"""Test setup: 4 fake CPU devices (multi-device tests need them; others use a 1-device mesh), and
LLVM at -O0: at the tests' tiny shapes compiling dominates and the generated code's speed does not
matter (bench/RESULTS.md has the measurement). The CLI tests' subprocesses inherit both, and
malloc's huge-page setting."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLI tests' launchers keep glibc's default pages rather than restarting with huge ones
# (`host_memory.restart_with_huge_pages`): the tests are compile-bound, huge pages pay off in
# long runs.
from ltdd_jax import host_memory  # pylint: disable=g-import-not-at-top  (imports no JAX)

if "glibc.malloc.hugetlb" not in os.environ.get("GLIBC_TUNABLES", ""):
  os.environ["GLIBC_TUNABLES"] = host_memory.with_tunable(os.environ.get("GLIBC_TUNABLES"),
                                                          "glibc.malloc.hugetlb=0")

import pathlib  # pylint: disable=g-import-not-at-top

import pytest  # pylint: disable=g-import-not-at-top

SHARED_CIFAR = pathlib.Path(__file__).resolve().parents[2] / "shared/data/cifar10-train-jpeg.tar.gz"
# DSA's scale and rotate families (bilinear resampling under a 6-way switch) cost most of a tiny
# program's compile time: the tests that are not about DSA augment with crop and flip only
# (tests/core/test_augment.py covers every family). The CLI tests pass the same override.
CHEAP_DSA = "crop_flip"
CLI_DSA = f"--config.dsa.strategy={CHEAP_DSA}"


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
  """One persistent compilation cache for the whole run, every program stored: a program one
  pytest-xdist worker or CLI subprocess compiled is loaded by the others, not compiled again.
  It lives in the run's temporary folder (both workers' common parent), so every run starts
  cold, as CI does; the subprocesses inherit it through the environment."""
  import jax  # pylint: disable=g-import-not-at-top
  base = tmp_path_factory.getbasetemp()
  directory = str((base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "xla")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


@pytest.fixture
def digits_config(tmp_path):
  """The digits config shrunk for tests, writing caches under tmp_path."""
  from configs import digits_lt  # pylint: disable=g-import-not-at-top
  c = digits_lt.get_config()
  c.data.cache_dir = str(tmp_path / "cache")
  c.model.width = 8
  c.model.depth = 2
  c.dsa.strategy = CHEAP_DSA
  return c


def tiny_config(tmp_dir):
  """digits with a 2-block width-8 ConvNet and every loop cut to a few steps."""
  from configs import digits_lt  # pylint: disable=g-import-not-at-top
  c = digits_lt.get_config()
  c.data.cache_dir = str(tmp_dir / "cache")
  c.dsa.strategy = CHEAP_DSA
  c.model.depth, c.model.width = 2, 8
  c.experts.num_experts, c.experts.epochs, c.experts.batch_size = 2, 4, 64
  c.experts.classifier_epochs = 2
  c.distill.ipc, c.distill.syn_steps, c.distill.expert_epochs = 2, 4, 1
  c.distill.max_start_epoch, c.distill.iterations, c.distill.batch_syn = 3, 6, 20
  c.distill.checkpoint_every, c.distill.log_every = 3, 1
  c.datm.initial_max_start_epoch, c.datm.window_grow_every = 1, 2
  c.evaluate.num_models, c.evaluate.epochs, c.evaluate.full_epochs = 2, 5, 2
  c.mesh.num_devices = 1
  return c


def train_flat_experts(config, data, directory, mesh):
  """The flat expert set of `config` on `data` (what `pipeline.stage_experts` trains), without a
  run around it."""
  from ltdd_jax.methods import experts  # pylint: disable=g-import-not-at-top
  from ltdd_jax.run import specs  # pylint: disable=g-import-not-at-top
  recipe = experts.recipe(specs.expert_spec(config), data.train_labels, data.num_classes)
  return experts.train_experts(recipe, experts.Labelling(data.num_classes), data.train_images,
                               data.train_labels, directory, mesh)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
  """(config, dataset, expert set) shared by the tests that need trained experts."""
  from ltdd_jax import parallel  # pylint: disable=g-import-not-at-top
  from ltdd_jax.run import pipeline  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("tiny")
  config = tiny_config(root)
  data = pipeline.load_dataset(config)
  expert_set = train_flat_experts(config, data, root / "experts" / "flat", parallel.make_mesh(1))
  return config, data, expert_set


def evaluate_arrays(config, data, images, targets, lr, epochs, method="random", ipc=None,
                    split="test"):
  """`protocol.evaluate_set` on arrays: the protocol of `config`, one device."""
  from ltdd_jax import parallel  # pylint: disable=g-import-not-at-top
  from ltdd_jax.evaluation import protocol  # pylint: disable=g-import-not-at-top
  from ltdd_jax.run import specs  # pylint: disable=g-import-not-at-top
  labelled = protocol.LabelledSet(images, protocol.hard_labels(targets), targets, lr, epochs, ipc,
                                  method)
  return protocol.evaluate_set(specs.protocol(config), labelled, protocol.HeldOut.of(data, split),
                               parallel.make_mesh(1))
