"""Statistics matching (`method=unilevel`) from the command line: observers, synthesis, report."""

import json
import subprocess
import sys
import types

import ml_collections
import numpy as np
import pytest

from conftest import CLI_DSA, tiny_config
from ltdd_jax import errors
from ltdd_jax.core import ensemble
from ltdd_jax.methods import observer
from ltdd_jax.run import pipeline, specs

TINY = ["--config.model.depth=2", "--config.model.width=8", "--config.unilevel.observer_epochs=2",
        "--config.unilevel.observer_batch_size=64", "--config.unilevel.iterations=4",
        "--config.unilevel.crops=2", "--config.distill.checkpoint_every=2",
        "--config.distill.log_every=1",
        "--config.evaluate.epochs=4", "--config.evaluate.num_models=2"]


def _run(tmp_path, method, *extra):
  cmd = [sys.executable, "-m", "launch.pipeline", "--config=configs/digits_lt.py", CLI_DSA,
         f"--workdir={tmp_path}", f"--config.data.cache_dir={tmp_path}/cache",
         f"--config.method={method}", *TINY, *extra]
  return subprocess.run(cmd, capture_output=True, text=True)


def test_unilevel_end_to_end_resumes_and_takes_the_plugins(tmp_path, monkeypatch):
  proc = _run(tmp_path, "unilevel+hierarchical+rectify", "--config.grouping.strategy=similarity",
              "--config.grouping.num_groups=2", "--config.two_stage.compare=False")
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / "report.json").read_text())
  assert report["method"] == "unilevel+hierarchical+rectify" and report["num_images"] == 20
  assert "group_acc" in report and "within_group_acc" in report  # evaluated two-stage
  assert len(json.loads((tmp_path / "grouping.json").read_text())["groups"]) == 2
  # The similarity grouping read the teacher: no trajectory experts were trained.
  assert not list((tmp_path / "experts").glob("flat*"))
  assert 0 <= report["test_acc_mean"] <= 100
  assert report["rectify"]["mode"] == "adsa" and report["rectify"]["tau"] >= 0  # teacher labels
  with np.load(tmp_path / "synthetic.npz") as syn:
    assert syn["images"].shape == (20, 8, 8, 1) and syn["soft_labels"].shape == (20, 10)
    np.testing.assert_array_equal(syn["labels"], np.repeat(np.arange(10), 2))
    np.testing.assert_allclose(syn["soft_labels"].sum(-1), 1.0, rtol=1e-5)
    assert syn["rectified_soft_labels"].shape == (20, 10)
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
  assert [r["step"] for r in lines if r["stage"] == "synthesize"] == [1, 2, 3, 4]
  assert any(r["stage"] == "observers" for r in lines)
  observers = list((tmp_path / "experts").glob("observers_*"))
  assert len(observers) == 1 and (observers[0] / "meta.json").exists()
  # Resumed with the run's own config: the observers and the synthesis are done, nothing trains.
  config = ml_collections.ConfigDict(json.loads((tmp_path / "config.json").read_text()))
  train = ensemble.train
  def no_observers(recipe, *args, **kwargs):
    assert not isinstance(recipe.kernel, observer.ObserverKernel), "the observers trained again"
    return train(recipe, *args, **kwargs)
  monkeypatch.setattr(ensemble, "train", no_observers)
  again = pipeline.stage_distill(pipeline.setup(config, tmp_path))
  with np.load(tmp_path / "synthetic.npz") as syn:
    np.testing.assert_array_equal(again.images, syn["images"])
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
  assert len([r for r in lines if r["stage"] == "synthesize"]) == 4
  # Any set under the teacher-relabel protocol, the observers' teacher already trained, with
  # RDED's student recipe (the default: AdamW, CutMix the teacher labels, KD at T = 20; the
  # protocol's own recipe under a teacher: tests/evaluation/test_protocol.py).
  config.method, config.evaluate.protocol = "unilevel", "relabel"
  report = pipeline.stage_evaluate(pipeline.setup(config, tmp_path, stages=("observers",)),
                                   "random")
  assert report["evaluation_protocol"] == "relabel" and report["method"] == "random"
  assert report["relabel_recipe"] == "rded" and 0 <= report["test_acc_mean"] <= 100


def test_too_few_crops_for_the_ipc_fail_before_training(tmp_path):
  config = tiny_config(tmp_path)
  config.method, config.distill.ipc, config.unilevel.crops = "unilevel", 500, 1
  config.distill.allow_duplicates = True
  with pytest.raises(errors.InputError, match="raise unilevel.crops"):
    pipeline.setup(config, tmp_path / "w")



def test_observer_lr_warms_up_then_falls_on_a_cosine(tmp_path):
  config = tiny_config(tmp_path)
  config.unilevel.observer_epochs = 40
  data = types.SimpleNamespace(num_classes=3, train_labels=np.zeros(64, np.int32))
  recipe, _ = specs.observer_recipe(config, data)
  lr = config.unilevel.observer_lr
  assert recipe.warmup_epochs == 2 and recipe.cosine  # 5% of 40 epochs
  lrs = [recipe.lr_at(e) for e in range(40)]
  assert lrs[:2] == [lr / 2, lr] and all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
  assert lrs[-1] < 0.01 * lr
  config.unilevel.observer_schedule = "constant"
  recipe, _ = specs.observer_recipe(config, data)
  assert recipe.warmup_epochs == 0 and {recipe.lr_at(e) for e in range(40)} == {lr}
