import importlib
import subprocess
import sys

import pytest

CONFIGS = ["digits_lt", "cifar10_lt", "cifar100_lt", "imagenet_lt"]


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("profile", ["cpu", "paper"])
def test_configs_load_with_every_section(name, profile):
  c = importlib.import_module(f"configs.{name}").get_config(f"profile={profile}")
  for section in ("data", "dsa", "model", "experts", "distill", "datm", "ltdd", "evaluate",
                  "grouping", "mesh"):
    assert section in c
  assert c.profile == profile
  with pytest.raises(AttributeError):
    c.distill.not_a_key = 1  # locked: typos fail


def test_cifar10_cpu_profile_matches_design():
  c = importlib.import_module("configs.cifar10_lt").get_config("profile=cpu,source=folder")
  assert (c.model.depth, c.model.width, c.data.zca, c.data.zca_eps, c.data.normalize) == (
      3, 32, True, 0.1, False)
  assert (c.experts.num_experts, c.experts.epochs, c.experts.lr, c.experts.batch_size) == (
      5, 10, 0.01, 256)
  assert (c.distill.ipc, c.distill.syn_steps, c.distill.expert_epochs, c.distill.max_start_epoch,
          c.distill.iterations, c.distill.lr_img, c.distill.batch_syn) == (10, 10, 2, 5, 200, 100.0,
                                                                           100)
  assert (c.evaluate.num_models, c.evaluate.epochs) == (3, 200)
  assert (c.data.test_source, c.data.test_path) == ("folder", "../shared/data/cifar10-test-jpeg.tar.gz")
  assert (c.data.validation_per_class, c.data.validation_from, c.data.n_max) == (100, "leftover", 0)


@pytest.mark.parametrize("name,kind,test,validation", [("cifar10_lt", "jpeg", 1000, 100),
                                                       ("cifar100_lt", "png", 100, 10)])
def test_shared_copies_with_the_real_test_split_or_the_earlier_holdout(name, kind, test, validation):
  module = importlib.import_module(f"configs.{name}")
  dataset = name.split("_")[0]
  real = module.get_config("profile=evidence,source=folder")
  assert real.data.train_path == f"../shared/data/{dataset}-train-{kind}.tar.gz"
  assert real.data.test_path == f"../shared/data/{dataset}-test-{kind}.tar.gz"
  held = module.get_config("profile=evidence,source=folder,test=holdout")
  assert (held.data.test_source, held.data.validation_per_class, held.data.validation_from) == (
      f"holdout:{test}", validation, "pool")
  with pytest.raises(ValueError, match="test must be 'real' or 'holdout'"):
    module.get_config("source=folder,test=both")


@pytest.mark.parametrize("name", ["cifar10_lt", "cifar100_lt"])
@pytest.mark.parametrize("ipc", [1, 10])
def test_evidence_profile_passes_the_checks(name, ipc):
  from ltdd_jax.run import checks  # pylint: disable=g-import-not-at-top
  for method in ("mtt", "datm", "ltdd", "ltdd+hierarchical"):
    c = importlib.import_module(f"configs.{name}").get_config(
        f"profile=evidence,source=folder,ipc={ipc},method={method}")
    checks.check_config(c)
  experts = (32, 5, 40, 0.05) if name == "cifar10_lt" else (32, 5, 30, 0.1)  # IF 100
  assert (c.model.width, c.experts.num_experts, c.experts.epochs, c.experts.lr) == experts
  assert c.distill.syn_lr_init == c.experts.lr  # the student starts at the experts' lr
  if ipc == 1:  # the published IPC-1 choices, every image in each inner batch
    classes = 10 if name == "cifar10_lt" else 100
    assert (c.distill.max_start_epoch, c.distill.batch_syn, c.datm.lr_label) == (4, classes, 5.0)
  assert c.datm.initial_max_start_epoch < c.distill.max_start_epoch


def test_evidence_grid_has_the_methods_and_full_rows():
  from ltdd_jax.run import benchmark  # pylint: disable=g-import-not-at-top
  c = importlib.import_module("configs.benchmark").get_config("profile=evidence")
  cells = benchmark.cells(c)
  assert cells[0] == (100.0, None, "full") and cells[1][:2] == (100.0, 10)
  methods = {m for _, ipc, m in cells if ipc is not None}
  assert methods == {"random", "herding", "mtt", "datm", "ltdd", "mtt+two_stage", "ltdd+two_stage",
                     "mtt+hierarchical@frequency_groups", "ltdd+hierarchical@frequency_groups",
                     "ltdd+two_stage@no_dam", "ltdd+hierarchical@no_dam_frequency_groups",
                     "datm+rectify", "ltdd+rectify",
                     "ltdd@no_dam", "ltdd+rectify@no_dam", "datm+rectify@validation",
                     "ltdd+rectify@validation", "ltdd+rectify@no_dam_validation"}
  assert len(cells) == 2 * (1 + 2 * 18)
  assert c.benchmark.ipc_settings.ipc1.distill.batch_syn == 10


def test_cifar100_evidence_grid_cells_take_their_factors_expert_epochs(tmp_path):
  """CIFAR-100's evidence experts fit ~20 minutes per factor: IF 10's larger set trains 20 epochs,
  IF 50's 30; every cell of a factor gets its factor's value, and passes the checks."""
  from ltdd_jax.run import benchmark, checks  # pylint: disable=g-import-not-at-top
  c = importlib.import_module("configs.benchmark").get_config(
      "profile=evidence,dataset=cifar100,grid=final")
  for factor, epochs in ((10.0, 20), (50.0, 30)):
    for method in ("mtt", "ltdd", "unilevel"):
      cell = benchmark.cell_config(c, factor, 10, method, tmp_path)
      checks.check_config(cell)
      assert (cell.experts.epochs, cell.experts.lr, cell.distill.syn_lr_init) == (epochs, 0.1, 0.1)
  cifar10 = importlib.import_module("configs.benchmark").get_config("profile=evidence,grid=final")
  assert benchmark.cell_config(cifar10, 10.0, 10, "mtt", tmp_path).experts.epochs == 40


def test_evidence_cifar10_takes_the_grouping_chosen_on_validation(tmp_path):
  """The evidence profile's CIFAR-10-LT runs and grid cells take the validated grouping (three
  similarity groups, one shared network, group experts by class) at both factors; a grid's
  command-line override still reaches its cells; the `frequency_groups` rows take the frequency
  grouping (the one `+hierarchical` chose on validation at IF 100) and nothing else; other profiles
  and CIFAR-100 keep the defaults."""
  from ltdd_jax.run import benchmark  # pylint: disable=g-import-not-at-top
  chosen = ("similarity", 3, "by_class", "shared")
  values = lambda c: (c.grouping.strategy, c.grouping.num_groups, c.grouping.stage1_sampling,
                      c.two_stage.arch)
  grid = importlib.import_module("configs.benchmark").get_config("profile=evidence,test=holdout")
  for factor in (10.0, 100.0):
    single = importlib.import_module("configs.cifar10_lt").get_config(
        f"profile=evidence,source=folder,test=holdout,imbalance_factor={factor:g}")
    assert values(single) == chosen
    assert values(benchmark.cell_config(grid, factor, 1, "mtt+hierarchical", tmp_path)) == chosen
    for row in ("mtt+hierarchical@frequency_groups", "ltdd+hierarchical@no_dam_frequency_groups"):
      cell = benchmark.cell_config(grid, factor, 10, row, tmp_path)
      assert values(cell) == ("frequency", 0, "by_class", "shared")
    assert not cell.ltdd.dam
  grid.unlock()
  grid.two_stage.arch = "separate"
  assert benchmark.cell_config(grid, 100.0, 10, "mtt+two_stage", tmp_path).two_stage.arch == (
      "separate")
  for name, arg in (("cifar10_lt", "profile=cpu"), ("cifar100_lt", "profile=evidence")):
    other = importlib.import_module(f"configs.{name}").get_config(arg)
    assert values(other) == ("frequency", 0, "class_balanced", "shared")


def test_bad_config_argument_fails():
  with pytest.raises(ValueError, match="Unknown config argument 'profil'"):
    importlib.import_module("configs.digits_lt").get_config("profil=cpu")


def test_unknown_override_fails_on_command_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "launch.inspect_data", "--config=configs/digits_lt.py",
       f"--workdir={tmp_path}", "--config.data.not_a_key=3"], capture_output=True, text=True)
  assert proc.returncode != 0
  assert "not_a_key" in proc.stderr


def test_ltdd_settings_follow_the_imbalance_factor():
  """LTDD's published per-factor choices: IF 10 weighs ED 1.0 / 0.2 and grows the window."""
  digits = importlib.import_module("configs.digits_lt").get_config()  # IF 10
  cifar = importlib.import_module("configs.cifar10_lt").get_config("imbalance_factor=100")
  assert (digits.ltdd.backbone_weight, digits.ltdd.classifier_weight, digits.ltdd.grow_window) == (
      1.0, 0.2, True)
  assert (cifar.ltdd.backbone_weight, cifar.ltdd.classifier_weight, cifar.ltdd.grow_window) == (
      0.5, 1.0, False)


@pytest.mark.parametrize("ipc,window,steps", [(1, (0, 20, 30), (40, 3)), (10, (0, 30, 50), (80, 2)),
                                              (50, (20, 70, 70), (80, 2))])
def test_cifar100_paper_profile_takes_datm_cifar100_values(ipc, window, steps):
  """DATM's CIFAR-100 configs: window floor / start / end, unroll and expert epochs, lr 1000."""
  from ltdd_jax.run import checks, specs  # pylint: disable=g-import-not-at-top
  c = importlib.import_module("configs.cifar100_lt").get_config(f"profile=paper,ipc={ipc},method=datm")
  checks.check_config(c)
  assert (c.datm.min_start_epoch, c.datm.initial_max_start_epoch, c.distill.max_start_epoch) == window
  assert (c.distill.syn_steps, c.distill.expert_epochs) == steps
  assert (c.distill.lr_img, c.distill.lr_lr, c.datm.lr_label, c.experts.epochs) == (
      1000.0, 1e-5, 10.0, 100)
  spec = specs.distill_spec(c, specs.method(c))
  end = {1: 1000, 10: 2000, 50: 0}[ipc]  # DATM's expansion_end_epoch
  assert spec.window.at(end) == (window[0], window[2])
  if end:
    assert spec.window.at(end - 1)[1] == window[2] - 1
  cifar10 = importlib.import_module("configs.cifar10_lt").get_config(f"profile=paper,ipc={ipc}")
  assert (cifar10.distill.lr_img, cifar10.experts.epochs) == (100.0 if ipc < 50 else 1000.0, 50)
