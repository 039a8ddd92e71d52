"""Bad inputs fail before any training, with a message that names the value."""

import subprocess
import sys

import numpy as np
import pytest

from conftest import tiny_config
from ltdd_jax import errors
from ltdd_jax.core import ensemble
from ltdd_jax.run import pipeline, resume

# (config overrides, text the error must contain). Each fails in `setup`, before any network trains.
BAD_CONFIGS = [
    ({"method": "dc"}, "Unknown method 'dc'"),
    ({"method": "mtt+threestage"}, "'threestage'"),
    ({"method": "random+hierarchical"}, "+hierarchical changes how the set is made"),
    ({"data.train_source": "s3"}, "data.train_source='s3'"),
    ({"data.test_source": "holdout:0"}, "data.test_source='holdout:0'"),
    ({"data.test_source": "hold"}, "data.test_source='hold'"),
    ({"data.train_source": "folder"}, "data.train_path=''"),
    ({"data.imbalance_profile": "linear"}, "data.imbalance_profile='linear'"),
    ({"data.imbalance_factor": 0.5}, "data.imbalance_factor=0.5"),
    ({"data.shot_rule": "quartiles"}, "data.shot_rule='quartiles'"),
    ({"dsa.mode": "some"}, "dsa.mode='some'"),
    ({"dsa.strategy": "color_blur"}, "'blur'"),
    ({"model.name": "resnet50"}, "model.name='resnet50'"),
    ({"model.norm": "layer"}, "model.norm='layer'"),
    ({"model.conv_impl": "winograd"}, "model.conv_impl='winograd'"),
    ({"model.ensemble_impl": "pmap"}, "model.ensemble_impl='pmap'"),
    ({"model.init": "xavier"}, "model.init='xavier'"),
    ({"mesh.num_devices": 0}, "mesh.num_devices=0"),
    ({"experts.num_experts": 0}, "experts.num_experts=0"),
    ({"experts.lr": -0.1}, "experts.lr=-0.1"),
    ({"experts.sampling": "balanced"}, "experts.sampling='balanced'"),
    ({"experts.loss": "focal"}, "experts.loss='focal'"),
    ({"experts.balanced_epoch": "largest"}, "experts.balanced_epoch='largest'"),
    ({"distill.ipc": -2}, "distill.ipc=-2"),
    ({"distill.syn_steps": 0}, "distill.syn_steps=0"),
    ({"distill.max_start_epoch": 30}, "exceeds experts.epochs"),
    ({"distill.init": "zeros"}, "distill.init='zeros'"),
    ({"distill.remat_policy": "all"}, "distill.remat_policy='all'"),
    ({"distill.lr_img": 0.0}, "distill.lr_img=0.0"),
    ({"method": "datm", "datm.min_start_epoch": 50}, "datm.min_start_epoch=50"),
    ({"method": "ltdd", "ltdd.dam_reduction": "mean"}, "ltdd.dam_reduction='mean'"),
    ({"method": "ltdd", "ltdd.classifier_max_start_epoch": 20}, "ltdd.classifier_max_start_epoch=20"),
    ({"method": "ltdd", "ltdd.init_experts": 0}, "ltdd.init_experts=0"),
    ({"evaluate.archs": ("convnet", "vit")}, "'vit' is not an architecture"),
    ({"evaluate.num_models": 0}, "evaluate.num_models=0"),
    ({"grouping.strategy": "kmeans"}, "grouping.strategy='kmeans'"),
    ({"grouping.prediction": "argmax"}, "grouping.prediction='argmax'"),
    ({"grouping.stage1_sampling": "per_group"}, "grouping.stage1_sampling='per_group'"),
    ({"method": "mtt+two_stage", "two_stage.arch": "joint"}, "two_stage.arch='joint'"),
    ({"evaluate.protocol": "teacher"}, "evaluate.protocol='teacher'"),
    ({"method": "mtt+two_stage", "evaluate.protocol": "relabel"}, "relabels the flat networks"),
    ({"evaluate.relabel_recipe": "edc"}, "evaluate.relabel_recipe='edc'"),
    ({"evaluate.rded.mix": "mixup"}, "evaluate.rded.mix='mixup'"),
    ({"evaluate.rded.batch_size": -1}, "evaluate.rded.batch_size=-1"),
    ({"evaluate.relabel_temperature": 4.0}, "is ignored under evaluate.relabel_recipe=rded"),
    ({"method": "random+two_stage", "grouping.stage1_loss": "balanced_softmax"},
     "shared two-stage network"),
    ({"grouping.manual": ((0, 1),)}, "ignored unless grouping.strategy=manual"),
    ({"method": "mtt+two_stage", "grouping.strategy": "manual"}, "needs the groups"),
    ({"method": "mtt+hierarchical", "grouping.lambda_1": 0.0, "grouping.lambda_2": 0.0},
     "nothing to match"),
    ({"discard_mismatched": "everything"}, "unknown stage(s) ['everything']"),
    ({"method": "datm+rectify", "rectify.mode": "validation", "data.validation_per_class": 0},
     "rectify.mode='validation': chooses tau on the validation split"),
    ({"rectify.at": "start"}, "rectify.at='start'"),
    ({"method": "unilevel", "unilevel.observer_schedule": "cosine"},
     "unilevel.observer_schedule='cosine'"),
    ({"evaluate.protocol": "relabel", "unilevel.observer_warmup": 1.0},
     "unilevel.observer_warmup=1.0"),
    # Checks that need the data (class sizes, the class list).
    ({"distill.ipc": 1000, "distill.allow_duplicates": False}, "distill.ipc=1000"),
    ({"method": "mtt+two_stage", "grouping.strategy": "manual",
      "grouping.manual": ((0, 1), (1, 2))}, "must partition the classes"),
    ({"method": "random+two_stage", "grouping.num_groups": 11}, "grouping.num_groups=11"),
]


@pytest.fixture
def no_training(monkeypatch):
  """Makes any network training fail the test: bad inputs must be caught before it."""
  def trained(*args, **kwargs):
    raise AssertionError("training started before the bad input was caught")
  monkeypatch.setattr(ensemble, "train", trained)  # the one trainer every network goes through


def _config(tmp_path, overrides):
  config = tiny_config(tmp_path)
  config.update_from_flattened_dict(overrides)
  return config


@pytest.mark.parametrize("overrides,message", BAD_CONFIGS,
                         ids=[",".join(o) for o, _ in BAD_CONFIGS])
def test_bad_config_fails_before_training(tmp_path, no_training, overrides, message):
  config = _config(tmp_path, overrides)
  with pytest.raises(errors.InputError) as info:
    pipeline.run_pipeline(config, tmp_path / "run")
  assert message in str(info.value)
  assert not (tmp_path / "run" / "config.json").exists(), "config.json only after the checks pass"


def test_every_problem_is_listed_at_once(tmp_path):
  config = _config(tmp_path, {"model.init": "xavier", "experts.loss": "focal"})
  with pytest.raises(errors.InputError, match=r"2 problem\(s\)") as info:
    pipeline.setup(config, tmp_path / "run")
  assert "model.init='xavier'" in str(info.value) and "experts.loss='focal'" in str(info.value)


def test_bad_workdirs(tmp_path, no_training):
  config = tiny_config(tmp_path)
  (tmp_path / "file").write_text("x")
  with pytest.raises(errors.WorkdirError, match="is a file"):
    pipeline.run_pipeline(config, tmp_path / "file")
  with pytest.raises(errors.WorkdirError, match="cannot be written"):
    pipeline.run_pipeline(config, "/proc/ltdd_jax_run")  # not writable, even for root


def test_full_disk_fails_before_training(tmp_path, no_training, monkeypatch):
  usage = resume.shutil.disk_usage(tmp_path)
  monkeypatch.setattr(resume.shutil, "disk_usage",
                      lambda _: usage._replace(free=3 * 2**20))
  with pytest.raises(errors.WorkdirError, match="has only 3.0 MiB free"):
    pipeline.run_pipeline(tiny_config(tmp_path), tmp_path / "run")


def test_bad_folder_sources(tmp_path, no_training):
  config = _config(tmp_path, {"data.train_source": "folder",
                              "data.train_path": str(tmp_path / "missing")})
  with pytest.raises(errors.MissingError, match="does not exist"):
    pipeline.run_pipeline(config, tmp_path / "run")
  (tmp_path / "data.tar.gz").write_bytes(b"not a tar archive at all")
  config.data.train_path = str(tmp_path / "data.tar.gz")
  with pytest.raises(errors.InputError, match="not a readable tar archive"):
    pipeline.run_pipeline(config, tmp_path / "run")


def _synthetic(path, **arrays):
  base = {"images": np.zeros((20, 8, 8, 1), np.float32), "labels": np.repeat(np.arange(10), 2),
          "lr": np.float32(0.01)}
  base.update(arrays)
  np.savez(path, **{k: v for k, v in base.items() if v is not None})
  return path


@pytest.mark.parametrize("arrays,message", [
    ({"lr": None}, "missing lr"),
    ({"labels": np.arange(7) % 10}, "(20, 8, 8, 1) images but (7,) labels"),
    ({"labels": np.repeat(np.arange(10), 2) + 5}, "labels must be integers in [0, 10)"),
    ({"labels": np.linspace(0, 9, 20)}, "labels must be integers"),
    ({"labels": np.array(["cat"] * 20)}, "labels must be integers"),
    ({"labels": np.zeros(20, complex)}, "labels must be integers"),
    ({"labels": np.array([None] * 20, dtype=object)}, "arrays of Python objects"),
    ({"images": np.zeros((20, 8, 8, 1), np.int32)}, "images must be floating point"),
    ({"lr": np.float32(np.nan)}, "learning rate"),
    ({"images": np.zeros((20, 4, 4, 1), np.float32)}, "images are (4, 4, 1)"),
])
def test_bad_synthetic_sets(tmp_path, no_training, arrays, message):
  config = tiny_config(tmp_path)
  path = _synthetic(tmp_path / "syn.npz", **arrays)
  with pytest.raises(errors.InputError) as info:
    pipeline.stage_evaluate(pipeline.setup(config, tmp_path / "run", stages=()),
                            f"synthetic:{path}")
  assert message in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04truncated"])
def test_empty_or_truncated_synthetic_file(tmp_path, no_training, content):
  config = tiny_config(tmp_path)
  (tmp_path / "syn.npz").write_bytes(content)
  with pytest.raises(errors.InputError, match="empty or truncated"):
    pipeline.stage_evaluate(pipeline.setup(config, tmp_path / "run", stages=()),
                            f"synthetic:{tmp_path / 'syn.npz'}")


def test_launcher_prints_one_line_for_errors_on_purpose(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "launch.pipeline", "--config=configs/digits_lt.py",
       f"--workdir={tmp_path}", "--config.model.init=xavier", "--config.distill.ipc=-2"],
      capture_output=True, text=True)
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  assert "error: 2 problem(s) in the config" in proc.stderr
  assert "model.init='xavier'" in proc.stderr and "distill.ipc=-2" in proc.stderr


def test_a_class_left_empty_by_the_long_tail_fails_before_any_expert(tmp_path, no_training):
  config = _config(tmp_path, {"data.imbalance_factor": 1000.0})  # digits: classes 7-9 get 0
  with pytest.raises(errors.InputError, match=r"class 7 \('7'\) has 0 training images.*"
                     "data.imbalance_factor"):
    pipeline.run_pipeline(config, tmp_path / "run")
  assert not (tmp_path / "run" / "experts").exists()


def test_a_one_class_folder_fails_before_any_expert(tmp_path, no_training):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  (tmp_path / "imgs" / "only").mkdir(parents=True)
  for i in range(30):
    Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / "imgs" / "only" / f"{i}.png")
  config = _config(tmp_path, {"data.train_source": "folder", "data.train_path": str(tmp_path / "imgs"),
                              "data.test_source": "holdout:5", "data.validation_per_class": 0})
  with pytest.raises(errors.InputError, match=r"1 class\(es\).*at least 2"):
    pipeline.run_pipeline(config, tmp_path / "run")
  assert not (tmp_path / "run" / "experts").exists()


def test_short_classes_get_one_note_each(tmp_path, no_training, caplog):
  config = _config(tmp_path, {"distill.ipc": 15, "method": "random"})
  ctx = pipeline.setup(config, tmp_path / "run", stages=())
  short = [c for c, n in enumerate(ctx.data.counts) if n < 15]
  notes = [r.getMessage() for r in caplog.records if "repeated to reach it" in r.getMessage()]
  assert len(notes) == len(short) > 1 and all(len(n) < 120 for n in notes)
