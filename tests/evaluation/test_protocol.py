import dataclasses
import json
import subprocess
import sys

import chex
import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CLI_DSA, evaluate_arrays
from ltdd_jax import checkpoints, models, parallel
from ltdd_jax.core import ensemble
from ltdd_jax.evaluation import protocol as evaluate
from ltdd_jax.evaluation import report as report_lib
from ltdd_jax.run import pipeline, specs


def test_oracle_set_scores_near_perfect(tiny):
  config, data, _ = tiny
  config = config.copy_and_resolve_references()
  config.evaluate.dsa = False
  config.model.width = 16
  config.evaluate.epochs, config.evaluate.batch_size = 40, 64
  report = evaluate_arrays(config, data, data.test_images, data.test_labels, 0.05, 40,
                           method="oracle")
  assert report["test_acc_mean"] > 97, report["test_acc_mean"]
  for field in report_lib.REPORT_FIELDS:
    assert field in report
  np.testing.assert_allclose(np.mean(report["per_class_acc"]), report["test_acc_mean"], atol=1e-6)


def test_evaluate_cli_writes_report(tmp_path):
  cmd = [sys.executable, "-m", "launch.evaluate", "--config=configs/digits_lt.py", CLI_DSA,
         f"--workdir={tmp_path}", "--set=random", "--config.model.width=4",
         "--config.evaluate.epochs=2", "--config.evaluate.num_models=2",
         f"--config.data.cache_dir={tmp_path}/cache", "--config.distill.ipc=3"]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-2000:]
  # The config's method is mtt, so the random set's report is named after the set.
  report = json.loads((tmp_path / "report_random.json").read_text())
  assert report["method"] == "random" and report["ipc"] == 3 and report["num_images"] == 30
  assert len(report["per_class_acc"]) == 10 and len(report["test_acc_per_model"]) == 2
  assert (tmp_path / "report_random_per_class.png").exists()
  assert not (tmp_path / "evaluate_ckpt").exists()  # the saved state is removed once reported


def test_validation_split(tiny):
  config, data, _ = tiny
  report = evaluate_arrays(config, data, data.train_images[:40], data.train_labels[:40],
                           0.01, 1, split="validation")
  assert report["split"] == "validation" and "test_acc_mean" not in report
  np.testing.assert_allclose(np.mean(report["per_class_acc"]), report["val_acc_mean"], atol=1e-6)
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
  assert "vgg11" in report_lib.format_report(report)
  assert ("vgg11", 4) in built  # the second row is a VGG-11 at the cross-architecture width


class Interrupted(Exception):
  """Stands in for a run killed between two epochs."""


@pytest.fixture
def epoch_counter(monkeypatch):
  """Counts evaluation epochs (list `ran`) and interrupts training after `stop_after[0]` of them."""
  ran, stop_after, make = [], [None], ensemble.epoch_program
  def counting(*args, **kwargs):
    epoch_fn = make(*args, **kwargs)
    def counted(*a):
      if stop_after[0] is not None and len(ran) == stop_after[0]:
        raise Interrupted
      ran.append(1)
      return epoch_fn(*a)
    return counted
  monkeypatch.setattr(ensemble, "epoch_program", counting)
  return ran, stop_after


def test_train_networks_resumes_exactly_and_never_another_evaluation(tiny, tmp_path,
                                                                      epoch_counter):
  config, data, _ = tiny
  ran, stop_after = epoch_counter
  protocol = dataclasses.replace(specs.protocol(config), checkpoint_seconds=0)
  model = models.make_classifier(protocol.model, data.num_classes)
  mesh = parallel.make_mesh(1)
  images, labels = data.train_images[:30], data.train_labels[:30]
  labelled = evaluate.LabelledSet(images, labels, labels, 0.01, 4, 3, "random")

  def train(train_set, checkpoint_dir=None, stop=None, protocol=protocol):
    ran.clear()
    stop_after[0] = stop
    params = evaluate.train_networks(protocol, model, train_set, mesh,
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
  protocol = dataclasses.replace(specs.protocol(config), checkpoint_seconds=0)
  model = models.make_classifier(protocol.model, data.num_classes)
  images, labels = data.train_images[:30], data.train_labels[:30]
  labelled = evaluate.LabelledSet(images, labels, labels, 1e9, 6, 3, "random")
  # The loss is taken before each update: the state goes non-finite while the loss is finite.
  with pytest.raises(evaluate.EvaluationDivergedError, match="diverged at epoch"):
    evaluate.train_networks(protocol, model, labelled, parallel.make_mesh(1),
                            checkpoint_dir=tmp_path)
  store = checkpoints.Checkpoints(tmp_path)
  saved = [] if store.latest_step() is None else [store.restore_any(store.latest_step())]
  assert ensemble.all_finite(saved)


@pytest.mark.parametrize("arch", ["separate", "shared"])
def test_stage_evaluate_resumes_a_two_stage_evaluation(tiny, tmp_path, epoch_counter, arch):
  """`separate` trains the group networks, then each group's: interrupted 2 epochs into the
  second, neither the group networks nor those 2 epochs run again. `shared` is one program of
  every head: 2 epochs in, they are not run again."""
  config, data, _ = tiny
  ran, stop_after = epoch_counter
  config = config.copy_and_resolve_references()
  config.method, config.evaluate.checkpoint_seconds = "random+two_stage", 0.0
  config.two_stage.arch = arch
  config.two_stage.compare = False  # the comparison networks resume as these do, each its folder

  def evaluate_in(workdir, stop=None):
    ran.clear()
    stop_after[0] = stop
    ctx = pipeline.setup(config, workdir, data)
    return pipeline.stage_evaluate(ctx, "random", two_stage=True)

  reference = evaluate_in(tmp_path / "whole")
  total = len(ran)
  done_before_stop = config.evaluate.epochs + 2 if arch == "separate" else 2
  if arch == "separate":
    assert total > 2 * config.evaluate.epochs  # the group networks, then each group's
  else:
    assert total == config.evaluate.epochs  # one network of every head
  with pytest.raises(Interrupted):
    evaluate_in(tmp_path / "resumed", stop=done_before_stop)
  resumed = evaluate_in(tmp_path / "resumed")
  assert len(ran) == total - done_before_stop
  assert resumed["per_class_acc"] == reference["per_class_acc"]
  assert resumed["group_acc"] == reference["group_acc"]
  assert not (tmp_path / "resumed" / "evaluate_ckpt").exists()


def test_saved_evaluation_state_of_other_shapes_or_corrupt_is_discarded(tmp_path):
  fingerprint = np.arange(32, dtype=np.uint8)
  open_store = lambda: evaluate.TimedStore(tmp_path, fingerprint, 0.0)
  store = open_store()
  assert store.restore({"w": np.zeros(3, np.float32)})[0] == 0
  store.save(2, {"w": np.arange(3, dtype=np.float32)})
  store.finish(None)
  store = open_store()
  done, state = store.restore({"w": np.zeros(3, np.float32)})
  assert done == 2 and state["w"].tolist() == [0, 1, 2]
  store.finish(None)
  # Another width: orbax would hand back the (3,) array; it must not be resumed.
  store = open_store()
  done, state = store.restore({"w": np.zeros(4, np.float32)})
  assert done == 0 and state["w"].shape == (4,) and store.store.latest_step() is None
  store.save(1, {"w": np.ones(4, np.float32)})
  store.finish(None)
  for path in (tmp_path / "1").rglob("*"):  # truncated by a crash mid-write
    if path.is_file():
      path.write_bytes(b"")
  store = open_store()
  done, _ = store.restore({"w": np.zeros(4, np.float32)})
  assert done == 0 and store.store.latest_step() is None
  store.finish(None)
  # Another evaluation's save (another fingerprint) is not resumed either.
  store = open_store()
  store.save(3, {"w": np.ones(4, np.float32)})
  store.finish(None)
  other = evaluate.TimedStore(tmp_path, fingerprint[::-1].copy(), 0.0)
  assert other.restore({"w": np.zeros(4, np.float32)})[0] == 0
  other.finish(None)


def test_readme_notebook_example_runs():
  """The README's library example (a labelled set evaluated without a run folder) still works."""
  import pathlib  # pylint: disable=g-import-not-at-top
  text = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
  block = text.split("```python\n", 1)[1].split("```", 1)[0]
  scope = {}
  block = block.replace("num_models=2", "num_models=1").replace(
      "augment.DSASpec()", "augment.DSASpec(strategy='crop_flip')")  # as the other tests (conftest)
  exec(block, scope)  # pylint: disable=exec-used
  assert scope["report"]["ipc"] == 5 and scope["report"]["num_images"] == 50
  assert scope["report"]["test_acc_mean"] > 50  # far above chance (10%) on digits


class _Oracle(flax_nn.Module):
  """A teacher that knows each training image's class: the logits stored beside its copy of the
  image (nearest stored image), 1e4 on the true class: exactly one-hot after a softmax."""

  @flax_nn.compact
  def __call__(self, x):
    stored = self.variable("memory", "images", jnp.zeros, (1, *x.shape[1:])).value
    logits = self.variable("memory", "logits", jnp.zeros, (1, 10)).value
    distance = jnp.square(x[:, None] - stored[None]).sum((2, 3, 4))
    return logits[distance.argmin(1)]


def test_relabel_with_a_one_hot_teacher_is_the_fixed_protocol(tiny):
  config, data, _ = tiny
  # The protocol's own recipe (evaluate.relabel_recipe=protocol): only the targets change.
  protocol = dataclasses.replace(specs.protocol(config), augment=None, num_models=2,
                                 relabel_student=None)
  images, labels = data.train_images[:60], data.train_labels[:60]
  labelled = evaluate.LabelledSet(images, labels, labels, 0.05, 3, None, "random")
  held_out = evaluate.HeldOut.of(data, "test")
  fixed = evaluate.evaluate_set(protocol, labelled, held_out, parallel.make_mesh(1))
  teacher = evaluate.Teacher(_Oracle(), {"memory": {
      "images": jnp.asarray(images), "logits": 1e4 * jax.nn.one_hot(jnp.asarray(labels), 10)}})
  relabelled = evaluate.evaluate_set(protocol, labelled, held_out, parallel.make_mesh(1),
                                     teacher=teacher)
  np.testing.assert_allclose(relabelled["test_acc_per_model"], fixed["test_acc_per_model"])
  np.testing.assert_allclose(relabelled["per_class_acc"], fixed["per_class_acc"])
  # The report says how the teacher labels the set's own images; `fixed` has no teacher to ask.
  assert "teacher_set_acc" not in fixed
  assert relabelled["teacher_set_acc"] == 100.0 and relabelled["teacher_set_confidence"] > 99.9
  # A teacher that relabels every image as class 0 is what the networks then learn.
  wrong = evaluate.Teacher(_Oracle(), {"memory": {
      "images": jnp.asarray(images), "logits": 1e4 * jax.nn.one_hot(jnp.zeros(60, int), 10)}})
  zeros = evaluate.evaluate_set(protocol, labelled, held_out, parallel.make_mesh(1),
                                teacher=wrong)
  assert zeros["per_class_acc"][0] == 100.0 and np.mean(zeros["per_class_acc"][1:]) < 5.0


def test_teacher_on_set_says_which_classes_the_teacher_keeps(tiny):
  _, data, _ = tiny
  index = np.concatenate([np.flatnonzero(data.train_labels == c)[:6] for c in range(10)])
  images, labels = data.train_images[index], data.train_labels[index]
  # A teacher that puts every image in class 0 keeps only class 0's images.
  zeros = evaluate.Teacher(_Oracle(), {"memory": {
      "images": jnp.asarray(images), "logits": 1e4 * jax.nn.one_hot(jnp.zeros(60, int), 10)}})
  view = evaluate.teacher_on_set(zeros, images, labels, 10, batch_size=16)
  assert view["teacher_set_acc"] == 10.0
  assert view["teacher_set_per_class_acc"] == [100.0] + [0.0] * 9
  assert view["teacher_set_pred_share"] == [100.0] + [0.0] * 9
  # One that moves class c's images to c + 1: nothing kept, each class's share moved along.
  shifted = evaluate.Teacher(_Oracle(), {"memory": {
      "images": jnp.asarray(images), "logits": jax.nn.one_hot(jnp.asarray((labels + 1) % 10), 10)}})
  view = evaluate.teacher_on_set(shifted, images, labels, 10)
  assert view["teacher_set_acc"] == 0.0 and view["teacher_set_pred_share"] == [10.0] * 10
  # Logits one apart over 10 classes: top probability e / (e + 9).
  np.testing.assert_allclose(view["teacher_set_confidence"], 100 * np.e / (np.e + 9), rtol=1e-5)


def test_student_recipe_replaces_the_protocols_training_only_under_a_teacher(tiny):
  config, data, _ = tiny
  config.evaluate.relabel_recipe = "protocol"
  protocol = specs.protocol(config)
  assert protocol.relabel_student is None  # the protocol's own recipe
  model = models.make_classifier(protocol.model, 10)
  labelled = evaluate.LabelledSet(data.train_images[:100], data.train_labels[:100],
                                  data.train_labels[:100], 0.05, 8, 10, "random")
  plain = protocol.recipe(model, labelled)
  assert plain.train.optimizer == "sgd" and plain.decay_epoch == 4 and plain.lr == 0.05
  student = evaluate.StudentRecipe()
  rded = protocol.recipe(model, labelled, student=student)
  assert (rded.train.optimizer, rded.train.mix, rded.train.temperature) == ("adamw", "cutmix", 20.0)
  assert rded.lr == 0.001 and rded.half_cosine and rded.decay_epoch is None
  assert rded.train.batch_size == 50 and rded.train.steps_per_epoch == 2  # RDED's at IPC 10
  assert evaluate.rded_batch_size(1, 10) == 10 and evaluate.rded_batch_size(50, 100) == 200
  assert evaluate.rded_batch_size(None, 10) == 100
  config.evaluate.relabel_recipe = "rded"
  assert specs.protocol(config).relabel_student == student
  assert specs.teacher_temperature(config) == 20.0
  with pytest.raises(Exception, match="Unknown student schedule"):
    evaluate.StudentRecipe(schedule="cosine")
  # Without a teacher the student recipe is not used: fixed training is what it was.
  small = dataclasses.replace(labelled, epochs=1)
  with_student = dataclasses.replace(protocol, relabel_student=student, augment=None, num_models=1)
  without = dataclasses.replace(with_student, relabel_student=None)
  mesh = parallel.make_mesh(1)
  chex.assert_trees_all_equal(evaluate.train_networks(with_student, model, small, mesh),
                              evaluate.train_networks(without, model, small, mesh))
