import dataclasses
import json
import subprocess
import sys

import chex
import numpy as np
import pytest

from conftest import evaluate_arrays
from ltdd_jax import checkpoints, evaluate, experts, models, parallel, pipeline, selection


def test_metrics_on_known_predictions():
  labels = np.repeat(np.arange(3), 4)  # balanced test set, 3 classes
  counts = np.array([100, 10, 1])
  perfect = labels[None]
  biased = np.zeros((1, 12), int)  # always predicts the head class
  m = evaluate.classification_metrics(np.concatenate([perfect, perfect]), labels, counts)
  assert m["test_acc_mean"] == 100 and m["test_acc_std"] == 0 and m["pred_kl_uniform"] == 0
  b = evaluate.classification_metrics(biased, labels, counts)
  np.testing.assert_allclose(b["per_class_acc"], [100, 0, 0])
  assert (b["many_acc"], b["medium_acc"], b["few_acc"], b["head_tail_gap"]) == (100, 0, 0, 100)
  np.testing.assert_allclose(b["pred_kl_uniform"], np.log(3))
  np.testing.assert_allclose(b["balanced_acc"], b["test_acc_mean"])


def test_oracle_set_scores_near_perfect(tiny):
  config, data, _ = tiny
  config = config.copy_and_resolve_references()
  config.evaluate.dsa = False
  config.model.width = 16
  config.evaluate.epochs, config.evaluate.batch_size = 40, 64
  report = evaluate_arrays(config, data, data.test_images, data.test_labels, 0.05, 40,
                           method="oracle")
  assert report["test_acc_mean"] > 97, report["test_acc_mean"]
  for field in evaluate.REPORT_FIELDS:
    assert field in report
  np.testing.assert_allclose(np.mean(report["per_class_acc"]), report["test_acc_mean"], atol=1e-6)


def test_random_selection_and_duplicates():
  labels = np.array([0] * 10 + [1] * 2)
  idx = selection.random_selection(labels, 2, 3, seed=0, allow_duplicates=True)
  np.testing.assert_array_equal(labels[idx], [0, 0, 0, 1, 1, 1])
  assert len(set(idx[:3])) == 3 and set(idx[3:]) == {10, 11}
  np.testing.assert_array_equal(idx, selection.random_selection(labels, 2, 3, 0, True))
  with pytest.raises(ValueError, match="class 1 has only 2 training images"):
    selection.random_selection(labels, 2, 3, seed=0)


def test_herding_starts_at_the_mean():
  features = np.array([[0.0], [10.0], [4.0], [6.0]])
  labels = np.zeros(4, int)
  idx = selection.herding_selection(features, labels, 1, 2)
  assert idx[0] in (2, 3)  # 4 and 6 are closest to the mean 5
  assert set(idx) == {2, 3}  # together they hit the mean exactly


def test_evaluate_cli_writes_report(tmp_path):
  cmd = [sys.executable, "-m", "launch.evaluate", "--config=configs/digits_lt.py",
         f"--workdir={tmp_path}", "--set=random", "--config.model.width=8",
         "--config.evaluate.epochs=3", "--config.evaluate.num_models=2",
         f"--config.data.cache_dir={tmp_path}/cache", "--config.distill.ipc=3"]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-2000:]
  # The config's method is mtt, so the random set's report is named after the set.
  report = json.loads((tmp_path / "report_random.json").read_text())
  assert report["method"] == "random" and report["ipc"] == 3 and report["num_images"] == 30
  assert len(report["per_class_acc"]) == 10 and len(report["test_acc_per_model"]) == 2
  assert (tmp_path / "report_random_per_class.png").exists()
  assert not (tmp_path / "evaluate_ckpt").exists()  # the saved state is removed once reported
  bad = subprocess.run(cmd[:-1] + ["--config.distill.ipc=500", "--config.distill.allow_duplicates=False"],
                       capture_output=True, text=True)
  assert bad.returncode != 0 and "allow_duplicates" in bad.stderr


def test_validation_split(tiny):
  config, data, _ = tiny
  report = evaluate_arrays(config, data, data.train_images[:40], data.train_labels[:40],
                           0.01, 1, split="validation")
  assert report["split"] == "validation"
  np.testing.assert_allclose(np.mean(report["per_class_acc"]), report["test_acc_mean"], atol=1e-6)
  # Validation numbers never touch the test split: poisoning it changes nothing.
  poisoned = dataclasses.replace(data, test_images=np.full_like(data.test_images, np.nan),
                                 test_labels=np.zeros_like(data.test_labels))
  again = evaluate_arrays(config, poisoned, data.train_images[:40], data.train_labels[:40],
                          0.01, 1, split="validation")
  assert again["per_class_acc"] == report["per_class_acc"]
  assert len(report["per_class_acc"]) == 10 and len(data.val_labels) == 10 * 10
  with pytest.raises(ValueError, match="split must be"):
    evaluate_arrays(config, data, data.train_images[:40], data.train_labels[:40], 0.01, 1,
                    split="train")


def test_cross_architecture_rows(tiny, monkeypatch):
  config, data, _ = tiny
  built, make = [], models.make_classifier
  monkeypatch.setattr(models, "make_classifier",
                      lambda cfg, n, arch=None, width=None: built.append((arch, width)) or
                      make(cfg, n, arch, width))
  config = config.copy_and_resolve_references()
  config.evaluate.archs = ("convnet", "vgg11")
  config.evaluate.cross_arch_width = 4
  report = evaluate_arrays(config, data, data.train_images[:40], data.train_labels[:40],
                           0.01, 1)
  assert list(report["archs"]) == ["convnet", "vgg11"] and report["arch"] == "convnet"
  assert report["test_acc_mean"] == report["archs"]["convnet"]["test_acc_mean"]
  assert "vgg11" in evaluate.format_report(report)
  assert ("vgg11", 4) in built  # the second row is a VGG-11 at the cross-architecture width


class Interrupted(Exception):
  """Stands in for a run killed between two epochs."""


@pytest.fixture
def epoch_counter(monkeypatch):
  """Counts evaluation epochs (list `ran`) and interrupts training after `stop_after[0]` of them."""
  ran, stop_after, make = [], [None], experts.make_epoch_fn
  def counting(*args, **kwargs):
    epoch_fn = make(*args, **kwargs)
    def counted(*a):
      if stop_after[0] is not None and len(ran) == stop_after[0]:
        raise Interrupted
      ran.append(1)
      return epoch_fn(*a)
    return counted
  monkeypatch.setattr(experts, "make_epoch_fn", counting)
  return ran, stop_after


def test_train_networks_resumes_exactly_and_never_another_evaluation(tiny, tmp_path,
                                                                      epoch_counter):
  config, data, _ = tiny
  ran, stop_after = epoch_counter
  protocol = dataclasses.replace(evaluate.Protocol.from_config(config), checkpoint_seconds=0)
  model = models.make_classifier(config.model, data.num_classes)
  mesh = parallel.make_mesh(1)
  images, labels = data.train_images[:30], data.train_labels[:30]
  labelled = evaluate.LabelledSet(images, labels, labels, 0.01, 4, 3, "random")

  def train(train_set, checkpoint_dir=None, stop=None, protocol=protocol):
    ran.clear()
    stop_after[0] = stop
    params = evaluate.train_networks(protocol, model, train_set, data.num_classes, 0, mesh,
                                     checkpoint_dir=checkpoint_dir)
    return params, len(ran)

  reference, _ = train(labelled)
  saved = tmp_path / "state"
  with pytest.raises(Interrupted):
    train(labelled, saved, stop=2)  # killed after epoch 2 (saved then: checkpoint_seconds=0)
  resumed, ran_after = train(labelled, saved)
  assert ran_after == 2
  chex.assert_trees_all_equal(resumed, reference)
  finished, ran_after = train(labelled, saved)  # trained networks are saved too: nothing to run
  assert ran_after == 0
  chex.assert_trees_all_equal(finished, reference)
  # Another set (here: another lr) or another recipe (weight decay) never resumes this save.
  other = dataclasses.replace(labelled, lr=0.02)
  fresh, _ = train(other)
  again, ran_after = train(other, saved)
  assert ran_after == 4
  chex.assert_trees_all_equal(again, fresh)
  _, ran_after = train(other, saved, protocol=dataclasses.replace(protocol, weight_decay=0.0))
  assert ran_after == 4


def test_diverging_evaluation_stops_at_once_and_saves_nothing_non_finite(tiny, tmp_path):
  config, data, _ = tiny
  protocol = dataclasses.replace(evaluate.Protocol.from_config(config), checkpoint_seconds=0)
  model = models.make_classifier(config.model, data.num_classes)
  images, labels = data.train_images[:30], data.train_labels[:30]
  labelled = evaluate.LabelledSet(images, labels, labels, 1e9, 6, 3, "random")
  # The loss is taken before each update: the state goes non-finite while the loss is finite.
  with pytest.raises(evaluate.EvaluationDivergedError, match="diverged at epoch"):
    evaluate.train_networks(protocol, model, labelled, data.num_classes, 0, parallel.make_mesh(1),
                            checkpoint_dir=tmp_path)
  store = checkpoints.Checkpoints(tmp_path)
  saved = [] if store.latest_step() is None else [store.restore_any(store.latest_step())]
  assert evaluate.all_finite(saved)


def test_stage_evaluate_resumes_a_two_stage_evaluation(tiny, tmp_path, epoch_counter):
  config, data, _ = tiny
  ran, stop_after = epoch_counter
  config = config.copy_and_resolve_references()
  config.method, config.evaluate.checkpoint_seconds = "random+two_stage", 0.0

  def evaluate_in(workdir, stop=None):
    ran.clear()
    stop_after[0] = stop
    ctx = pipeline.setup(config, workdir, data)
    return pipeline.stage_evaluate(ctx, "random", two_stage=True)

  reference = evaluate_in(tmp_path / "whole")
  total = len(ran)
  assert total > 2 * config.evaluate.epochs  # the group networks, then each group's
  with pytest.raises(Interrupted):
    evaluate_in(tmp_path / "resumed", stop=config.evaluate.epochs + 2)
  resumed = evaluate_in(tmp_path / "resumed")
  # The group networks were trained and the next ones had 2 epochs: neither runs again.
  assert len(ran) == total - config.evaluate.epochs - 2
  assert resumed["per_class_acc"] == reference["per_class_acc"]
  assert resumed["group_acc"] == reference["group_acc"]
  assert not (tmp_path / "resumed" / "evaluate_ckpt").exists()


def test_saved_evaluation_state_of_other_shapes_or_corrupt_is_discarded(tmp_path):
  fingerprint = np.arange(32, dtype=np.uint8)
  store, _, _ = evaluate.open_state(tmp_path, {"w": np.zeros(3, np.float32)}, fingerprint)
  store.save(2, {"state": {"w": np.arange(3, dtype=np.float32)}, "fingerprint": fingerprint})
  store.close()
  store, done, state = evaluate.open_state(tmp_path, {"w": np.zeros(3, np.float32)}, fingerprint)
  assert done == 2 and state["w"].tolist() == [0, 1, 2]
  store.close()
  # Another width: orbax would hand back the (3,) array; it must not be resumed.
  store, done, state = evaluate.open_state(tmp_path, {"w": np.zeros(4, np.float32)}, fingerprint)
  assert done == 0 and state["w"].shape == (4,) and store.latest_step() is None
  store.save(1, {"state": {"w": np.ones(4, np.float32)}, "fingerprint": fingerprint})
  store.close()
  for path in (tmp_path / "1").rglob("*"):  # truncated by a crash mid-write
    if path.is_file():
      path.write_bytes(b"")
  store, done, _ = evaluate.open_state(tmp_path, {"w": np.zeros(4, np.float32)}, fingerprint)
  assert done == 0 and store.latest_step() is None
  store.close()


def test_readme_notebook_example_runs():
  """The README's library example (a labelled set evaluated without a run folder) still works."""
  import pathlib  # pylint: disable=g-import-not-at-top
  text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
  block = text.split("```python\n", 1)[1].split("```", 1)[0]
  scope = {}
  exec(block.replace("num_models=2", "num_models=1"), scope)  # pylint: disable=exec-used
  assert scope["report"]["ipc"] == 5 and scope["report"]["num_images"] == 50
  assert scope["report"]["test_acc_mean"] > 50  # far above chance (10%) on digits
