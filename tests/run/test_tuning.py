"""The validation-split search: every candidate runs, the choice reads validation reports only."""

import dataclasses
import json
import pathlib

import ml_collections
import numpy as np
import pytest

from conftest import tiny_config
from ltdd_jax import errors
from ltdd_jax.run import checks, tuning
from ltdd_jax.data import dataset as dataset_lib


def _search_config(tmp_path):
  config = tiny_config(tmp_path)
  config.unlock()
  config.method = "mtt+two_stage"
  config.distill.iterations = 2
  config.experts.directory = str(tmp_path / "shared_experts")
  config.tuning = ml_collections.ConfigDict()
  config.tuning.search = ml_collections.ConfigDict({"grouping": {"num_groups": (2, 3)}})
  return config


def test_choice_reads_validation_only(tmp_path, monkeypatch, capsys):
  config = _search_config(tmp_path)
  clean = tuning.run_search(config, tmp_path / "clean")
  assert len(clean["rows"]) == 2 and clean["chosen"] in ({"grouping.num_groups": 2},
                                                         {"grouping.num_groups": 3})
  # The grouping only changes the evaluation of mtt+two_stage: one distillation serves both.
  assert "candidate 2 takes the distillation of an earlier one" in capsys.readouterr().out
  first, second = sorted((tmp_path / "clean").glob("*/synthetic.npz"))
  np.testing.assert_array_equal(np.load(first)["images"], np.load(second)["images"])
  table = (tmp_path / "clean" / "selection.md").read_text()
  assert "(chosen)" in table and "2 of 2 candidates finished" in table
  assert json.loads((tmp_path / "clean" / "selection.json").read_text())["split"] == "validation"
  assert not list((tmp_path / "clean").glob("*/report.json")), "no test-split report is written"

  load = dataset_lib.load_dataset
  def poisoned(*args, **kwargs):  # the test split is NaN: reading it would change the numbers
    data = load(*args, **kwargs)
    return dataclasses.replace(data, test_images=np.full_like(data.test_images, np.nan),
                               test_labels=np.zeros_like(data.test_labels))
  monkeypatch.setattr(dataset_lib, "load_dataset", poisoned)
  dirty = tuning.run_search(config, tmp_path / "poisoned")
  assert dirty["chosen"] == clean["chosen"]
  for a, b in zip(clean["rows"], dirty["rows"]):
    assert a["val_acc_mean"] == b["val_acc_mean"]
  capsys.readouterr()
  tuning.run_search(config, tmp_path / "poisoned")  # resumed: nothing runs again
  assert "[tuning] candidate" not in capsys.readouterr().out


def test_bad_search_fails_before_any_run(tmp_path):
  config = _search_config(tmp_path)
  config.tuning.search = ml_collections.ConfigDict({"grouping": {"strategy": ("frequency", "kmeans")}})
  with pytest.raises(errors.InputError, match="grouping.strategy='kmeans'"):
    tuning.run_search(config, tmp_path / "bad")
  assert not (tmp_path / "bad").exists()
  config.tuning.search = ml_collections.ConfigDict({"grouping": {"lamda_1": (1.0,)}})
  with pytest.raises(errors.InputError, match="'grouping.lamda_1', which is not a config key"):
    tuning.run_search(config, tmp_path / "bad")


def test_candidates_share_experts_only_when_their_expert_settings_agree(tmp_path):
  config = _search_config(tmp_path)
  config.experts.directory = ""
  config.tuning.search = ml_collections.ConfigDict({"experts": {"lr": (0.05, 0.1)},
                                                    "grouping": {"num_groups": (2, 3)}})
  configs = [tuning.candidate_config(config, v, tmp_path) for v in tuning.candidates(config.tuning)]
  folders = [c.experts.directory for c in configs]
  assert len(set(folders)) == 2  # two expert lrs; the group counts share theirs
  assert len({tuning.candidate_name(v) for v in tuning.candidates(config.tuning)}) == 4


@pytest.mark.parametrize("search,method,keys", [
    ("hierarchical", "mtt+hierarchical", {"grouping.lambda_1", "grouping.lambda_2",
                                          "grouping.strategy", "grouping.num_groups"}),
    ("grouping", "mtt+two_stage", {"grouping.strategy", "grouping.num_groups",
                                   "two_stage.arch"}),
    ("stage1", "mtt+hierarchical", {"grouping.stage1_sampling"}),
    ("distill", "mtt", {"distill.max_start_epoch", "distill.lr_img"}),
    ("labels", "datm", {"datm.lr_label"}),
    ("synthesis", "unilevel", {"unilevel.iterations", "unilevel.lr"}),
    ("statistics", "unilevel", {"unilevel.statistics_weight", "unilevel.iterations",
                                "unilevel.lr"}),
])
def test_tune_config_searches(search, method, keys):
  from configs import tune  # pylint: disable=g-import-not-at-top
  config = tune.get_config(f"dataset=cifar10,profile=evidence,search={search}")
  assert config.method == method
  grid = tuning.candidates(config.tuning)
  assert set(grid[0]) == keys and len({json.dumps(c, sort_keys=True) for c in grid}) == len(grid)
  for values in grid:  # every candidate is a valid config
    checks.check_config(tuning.candidate_config(config, values, pathlib.Path("/tmp/unused")))
  with pytest.raises(ValueError, match="search must be one of"):
    tune.get_config("search=window")


def test_candidates_share_a_distillation_only_when_its_settings_agree(tmp_path):
  config = _search_config(tmp_path)
  values = [{"grouping.num_groups": 2}, {"grouping.num_groups": 3}]
  def folders_of(method):
    config.method = method
    configs = [tuning.candidate_config(config, v, tmp_path) for v in values]
    folders = {tmp_path / method / tuning.candidate_name(v): (i, v, c)
               for i, (v, c) in enumerate(zip(values, configs))}
    first = next(iter(folders))
    first.mkdir(parents=True)
    (first / "synthetic.npz").write_bytes(b"")
    return folders, configs
  folders, configs = folders_of("mtt+two_stage")
  assert tuning.same_distillation(configs[1], list(folders)[1], folders) == list(folders)[0]
  longer = configs[1].copy_and_resolve_references()
  longer.distill.iterations += 1  # a longer distillation is not the one there
  assert tuning.same_distillation(longer, list(folders)[1], folders) is None
  folders, configs = folders_of("mtt+hierarchical")  # the grouping is part of its objective
  assert tuning.same_distillation(configs[1], list(folders)[1], folders) is None
