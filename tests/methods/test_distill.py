import dataclasses
import json
import signal
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ltdd_jax import checkpoints, parallel
from ltdd_jax.methods import distill, experts, registry, synthetic
from ltdd_jax.run import specs
from conftest import CLI_DSA

ONE = parallel.make_mesh(1)


def _classifier_set(config, data, expert_set):
  if not specs.method(config).options.ed:
    return None
  return experts.train_classifier_experts(specs.expert_spec(config), expert_set, data.train_images,
                                          data.train_labels, ONE)


def _objective(config, data, expert_set, mesh=None):
  """The flat objective of `config` and the initial synthetic state, as the distill stage makes."""
  method = specs.method(config)
  classifier_set = _classifier_set(config, data, expert_set)
  source = distill.ExpertSource(expert_set, classifier_set, np.arange(data.num_classes),
                                data.counts, config.experts.sampling)
  objective = distill.make_objective(source, specs.matching_options(config, method), mesh)
  init = synthetic.initial_synthetic(specs.init_spec(config, method), data, expert_set,
                                     classifier_set)[0]
  return objective, init


def _run(config, objectives, init, directory, mesh=ONE):
  return distill.run_distillation(specs.distill_spec(config, specs.method(config)), objectives,
                                  init, directory / "distill_ckpt", mesh)


def _syn(state):
  """What an objective's loss takes, from a synthetic state."""
  state = {k: jnp.asarray(v) for k, v in state.items()}
  return {"images": state["images"], "targets": synthetic.targets_of(state),
          "lr": jnp.exp(state["log_lr"])}


class _InMemory:
  """The trajectory-reader interface over an expert set held in memory, cast (e.g. to float64)."""

  def __init__(self, expert_set, cast):
    self.expert_set, self.cast = expert_set, cast

  @property
  def num_experts(self):
    return self.expert_set.num_experts

  @property
  def num_epochs(self):
    return self.expert_set.epochs

  def get(self, k, epoch):
    return self.cast(self.expert_set.load_epoch(k, epoch))


@pytest.mark.parametrize("method", ["mtt", "ltdd"])
def test_resume_is_bitwise_identical(tiny, tmp_path, method):
  config, data, expert_set = tiny
  config = config.copy_and_resolve_references()
  config.method = method
  objective, init = _objective(config, data, expert_set)
  full = _run(config, [objective], init, tmp_path / "full")
  half = config.copy_and_resolve_references()
  half.distill.iterations = 3  # "crash" after the checkpoint at iteration 3 ...
  _run(half, [objective], init, tmp_path / "resumed")
  resumed = _run(config, [objective], init, tmp_path / "resumed")
  assert set(full) == set(resumed)
  for k in full:
    np.testing.assert_array_equal(full[k], resumed[k])
  assert not np.array_equal(full["images"], init["images"])
  if method == "ltdd":
    assert "label_logits" in full and not np.array_equal(full["label_logits"], init["label_logits"])


def _sample(config, objective, it):
  rng = np.random.default_rng([config.seed, it])
  return [objective.sample(rng, 0, config.distill.max_start_epoch, config.distill.expert_epochs)]


def test_four_devices_equal_one(tiny):
  """For the same inputs, one outer update on 4 devices equals the 1-device update to float32
  rounding (3 iterations, each started from the 1-device state). Whole float32 runs are not
  compared: the outer gradient jumps where a ReLU input crosses 0, and lr_img=1000 turns a 1e-7
  rounding difference there into a 0.25 change of a few pixels (measured). Observed here: at most
  1.3e-6 of the largest gradient or step over 100 draws; the tolerance, 1e-5, leaves 8x."""
  config, data, expert_set = tiny
  config = config.copy_and_resolve_references()
  objective, init = _objective(config, data, expert_set)
  meshes = [parallel.make_mesh(n) for n in (1, 4)]
  spec = specs.distill_spec(config, specs.method(config))
  fns = [distill.make_update_fn(spec, [dataclasses.replace(
      objective, student=dataclasses.replace(objective.student, mesh=m))]) for m in meshes]
  syn = {k: jnp.asarray(v) for k, v in init.items()}
  opt = fns[0][1](syn)
  for it in range(3):
    pairs = _sample(config, objective, it)
    key = jax.random.fold_in(jax.random.key(config.seed), it)
    (s1, o1, l1, _), (s4, o4, l4, _) = [
        parallel.gather(update(*parallel.replicate((syn, opt, pairs), m), key))
        for (update, _), m in zip(fns, meshes)]
    np.testing.assert_allclose(l4, l1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(o1), jax.tree.leaves(o4)):  # momentum traces: the gradients
      np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())
    step = s1["images"] - np.asarray(syn["images"])
    np.testing.assert_allclose(s4["images"], s1["images"], rtol=0, atol=1e-5 * np.abs(step).max())
    syn, opt = s1, o1


def test_four_devices_equal_one_float64(tiny, tmp_path):
  """A whole 2-iteration run in float64, where rounding (~1e-15) cannot reach a ReLU kink: the
  4-device run equals the 1-device run (measured: 1e-14)."""
  config, data, expert_set = tiny
  config = config.copy_and_resolve_references()
  config.distill.iterations = 2
  with jax.enable_x64(True):
    f64 = lambda t: jax.tree.map(lambda x: x.astype(np.float64) if x.dtype == np.float32 else x, t)
    out = []
    for n in (1, 4):
      mesh = parallel.make_mesh(n)
      objective, init = _objective(config, data, expert_set, mesh)
      objective = dataclasses.replace(objective, experts=_InMemory(expert_set, f64))
      out.append(_run(config, [objective], f64(init), tmp_path / str(n), mesh))
  assert out[0]["images"].dtype == np.float64
  np.testing.assert_allclose(out[1]["images"], out[0]["images"], rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(out[1]["log_lr"], out[0]["log_lr"], rtol=1e-10)


def test_each_objective_learns_its_own_lr(tiny, tmp_path):
  """Several objectives (the hierarchical stages) get one learned lr each, moved by their own loss
  only; with distill.lr_per_objective off they share one."""
  config, data, expert_set = tiny
  config = config.copy_and_resolve_references()
  config.distill.iterations = 3
  objective, init = _objective(config, data, expert_set)
  slow = dataclasses.replace(objective, name="slow", weight=0.0)
  out = _run(config, [objective, slow], init, tmp_path / "own")
  chex.assert_shape(out["log_lr"], (2,))
  assert out["log_lr"][1] == init["log_lr"], "a zero-weight objective's lr must not move"
  assert out["log_lr"][0] != init["log_lr"]
  distilled = synthetic.DistilledSet.from_state(out, ["flat", "slow"])
  distilled.save(tmp_path / "own", data.preprocessor, "two lrs", per_class=2)
  syn = synthetic.DistilledSet.load(tmp_path / "own" / "synthetic.npz")
  assert syn.lr_objectives == ("flat", "slow")
  np.testing.assert_array_equal(syn.lr, distilled.lr)
  lrs = syn.labelled("mtt+hierarchical", 3, data.num_classes).learned_lrs
  assert list(lrs) == ["flat", "slow"]
  np.testing.assert_allclose(lrs["slow"], config.distill.syn_lr_init, rtol=1e-6)
  assert syn.labelled("mtt", 3, data.num_classes, fixed_lr=0.5).learned_lrs == {}
  config.distill.lr_per_objective = False
  shared = _run(config, [objective, slow], init, tmp_path / "shared")
  chex.assert_shape(shared["log_lr"], ())


def test_thirty_iterations_lower_the_matching_loss(tiny, tmp_path):
  config, data, expert_set = tiny
  config = config.copy_and_resolve_references()
  config.distill.iterations = 30
  config.distill.checkpoint_every = 30
  objective, init = _objective(config, data, expert_set)
  rng = np.random.default_rng(123)
  probes = [objective.sample(rng, 0, config.distill.max_start_epoch, 1) for _ in range(6)]

  @jax.jit
  def probe_loss(state):
    return jnp.mean(jnp.stack([objective.loss(_syn(state), p, jax.random.key(i))
                               for i, p in enumerate(probes)]))

  before = float(probe_loss(init))
  after = float(probe_loss(_run(config, [objective], init, tmp_path)))
  assert after < before, (before, after)


def test_divergence_stops_with_message_and_loadable_checkpoint(tiny, tmp_path):
  config, data, expert_set = tiny
  config = config.copy_and_resolve_references()
  config.distill.lr_img = 1e30
  config.distill.iterations = 6
  objective, init = _objective(config, data, expert_set)
  with pytest.raises(distill.DivergenceError, match="diverged.*lr_img"):
    _run(config, [objective], init, tmp_path)
  store = checkpoints.Checkpoints(tmp_path / "distill_ckpt")
  step = store.latest_step()
  assert step is not None
  state = store.restore_any(step)
  assert np.isfinite(state["syn"]["images"]).all()


def test_bad_epochs_and_methods_fail_clearly(tiny):
  config, data, expert_set = tiny
  config = config.copy_and_resolve_references()
  config.distill.max_start_epoch = 10
  objective, _ = _objective(config, data, expert_set)
  with pytest.raises(ValueError, match="exceeds the experts' 4 epochs"):
    distill.check_epochs(specs.distill_spec(config, specs.method(config)), [objective])
  with pytest.raises(ValueError, match="Unknown method 'dc'"):
    registry.parse("dc")


def test_pipeline_cli_end_to_end_through_a_sigint(tmp_path):
  """The main job from the command line, stopped by SIGINT during distillation (exit 130, one
  line, no traceback) and finished by the same command, which says what it resumes from.
  (That a resumed distillation is bitwise the uninterrupted one: `test_resume_is_bitwise_identical`.)
  """
  cmd = [sys.executable, "-m", "launch.pipeline", "--config=configs/digits_lt.py", CLI_DSA,
         f"--workdir={tmp_path}", f"--config.data.cache_dir={tmp_path}/cache",
         "--config.model.width=4", "--config.experts.num_experts=2", "--config.experts.epochs=3",
         "--config.experts.batch_size=128", "--config.distill.batch_syn=20",
         "--config.distill.ipc=2", "--config.distill.syn_steps=3",
         "--config.distill.max_start_epoch=2", "--config.distill.expert_epochs=1",
         "--config.distill.checkpoint_every=1000", "--config.evaluate.epochs=2",
         "--config.evaluate.num_models=2", "--config.method=mtt+hierarchical"]
  proc = subprocess.Popen([*cmd, "--config.distill.iterations=400"], text=True,
                          stderr=subprocess.PIPE)
  for line in proc.stderr:  # the first progress line of the distillation
    if line.startswith("[distill]"):
      break
  proc.send_signal(signal.SIGINT)
  rest = proc.stderr.read()
  assert proc.wait(timeout=60) == 130, rest
  assert "Traceback" not in rest
  assert "interrupted (SIGINT); rerun the same command to resume from distillation iteration" in rest
  stopped = int(rest.split("distillation iteration ")[1].split("/")[0])
  assert 0 < stopped < 400
  assert not (tmp_path / "synthetic.npz").exists()
  end = stopped + 2  # A shorter end than 400, so the test stays short.
  again = subprocess.run([*cmd, f"--config.distill.iterations={end}"], capture_output=True,
                         text=True)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"resuming from iteration {stopped}/{end}" in again.stderr
  for name in ("config.json", "metrics.jsonl", "synthetic.npz", "synthetic.png", "report.json",
               "report_per_class.png", "grouping.json", "wall_clock.json"):
    assert (tmp_path / name).exists(), name
  report = json.loads((tmp_path / "report.json").read_text())
  assert report["method"] == "mtt+hierarchical" and report["ipc"] == 2
  assert report["num_images"] == 20  # the flat budget: C x IPC
  assert report["classifier"] == "two_stage_soft" and 0 <= report["group_acc"] <= 100
  # One hierarchical set, three classifiers: flat, separate and shared (the report's own).
  assert report["two_stage_arch"] == "shared"
  assert list(report["classifiers"]) == ["flat", "separate", "shared"]
  assert report["classifiers"]["shared"]["test_acc_mean"] == report["test_acc_mean"]
  assert "group_acc" not in report["classifiers"]["flat"]
  assert 0 <= report["classifiers"]["separate"]["within_group_acc"] <= 100
  assert report["wall_seconds"] > report["segment_seconds"] > 0  # both segments counted
  groups = json.loads((tmp_path / "grouping.json").read_text())["groups"]
  assert len(groups) > 1
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
  losses = [r for r in lines if r["stage"] == "distill"]
  assert [r["step"] for r in losses][-1] == end
  assert len(losses[-1]["losses"]) == 1 + sum(len(g) > 1 for g in groups)  # stage 1 + stage 2
  with np.load(tmp_path / "synthetic.npz") as syn:
    assert syn["images"].shape == (20, 8, 8, 1) and syn["pixels"].shape == (20, 8, 8, 1)
    assert syn["labels"].shape == (20,)
    # One learned lr per objective; each two-stage network trains with its own.
    names = ["groups"] + [f"group_{g}" for g, c in enumerate(groups) if len(c) > 1]
    assert list(syn["lr_objectives"]) == names and (syn["lr"] > 0).all()
  assert sorted(report["learned_lrs"]) == sorted(names)
  assert [r["stage"] for r in lines].count("evaluate") == 1


@pytest.mark.parametrize("method", ["datm", "ltdd"])
def test_initial_soft_labels_point_at_their_own_class(tiny, method):
  """Every image's initial label argmax is its class, whatever the experts get wrong (the tiny
  experts misclassify whole classes), and the per-class record says where labels came from."""
  config, data, expert_set = tiny
  config = config.copy_and_resolve_references()
  config.method = method
  config.distill.ipc = 4
  classifier_set = _classifier_set(config, data, expert_set)
  init_spec = specs.init_spec(config, specs.method(config))
  state, record = synthetic.initial_synthetic(init_spec, data, expert_set, classifier_set)
  np.testing.assert_array_equal(state["label_logits"].argmax(-1), state["labels"])
  np.testing.assert_array_equal(record["init_label_acc"], 1.0)
  chex.assert_shape([record["init_expert_correct"], record["init_found"]], [(10,), (10,)])
  correct = synthetic.expert_correct(classifier_set or expert_set, data.train_images,
                                     data.train_labels, init_spec.labels.search_experts).any(0)
  available = np.bincount(data.train_labels[correct], minlength=10)
  np.testing.assert_array_equal(record["init_found"], np.minimum(available, 4))
  short = record["init_found"] == 0  # no correctly classified image: class-correct fallback
  assert (record["init_expert_correct"][short] == 0).all()


def test_select_correct_searches_experts_then_duplicates_or_fills():
  labels = np.array([0] * 6 + [1] * 6 + [2] * 6)
  correct = np.zeros((3, 18), bool)
  correct[0, [0, 1, 6]] = True      # expert 0: two images of class 0, one of class 1
  correct[1, [2, 7, 8]] = True      # expert 1: one more of class 0, two more of class 1
  datm = synthetic.LabelInitSpec(search_experts=-1, duplicate=False)
  idx, found = synthetic.select_correct(correct, labels, 3, 3, datm, seed=0)
  np.testing.assert_array_equal(found, [3, 3, 0])
  assert set(idx[:3]) == {0, 1, 2} and set(idx[3:6]) == {6, 7, 8}
  assert (labels[idx[6:]] == 2).all() and len(set(idx[6:])) == 3  # none correct: own images
  ltdd = synthetic.LabelInitSpec(search_experts=1, duplicate=True)
  idx, found = synthetic.select_correct(correct, labels, 3, 3, ltdd, seed=0)
  np.testing.assert_array_equal(found, [2, 1, 0])
  assert set(idx[:3]) == {0, 1} and list(idx[3:6]) == [6, 6, 6]  # repeated, not misclassified
  logits = np.zeros((2, 3, 3))
  logits[0] = [[5, 0, 0], [0, 5, 0], [1, 0, 0]]   # expert 0: right on images 0, 1
  logits[1] = [[3, 1, 0], [4, 0, 0], [2, 0, 0]]   # expert 1: right on image 0 only
  label_logits, from_experts = synthetic.mean_correct_logits(logits, np.array([0, 1, 2]))
  np.testing.assert_allclose(label_logits[0], [4, 0.5, 0])  # mean of the two correct experts
  np.testing.assert_allclose(label_logits[1], [0, 5, 0])    # expert 0 alone
  np.testing.assert_array_equal(from_experts, [True, True, False])
  assert label_logits[2].argmax() == 2  # class-correct fallback


def test_ltdd_window_is_uniform_and_datm_window_grows(tiny):
  config, _, _ = tiny
  config = config.copy_and_resolve_references()
  config.distill.max_start_epoch = 3
  config.ltdd.grow_window = False  # LTDD's IF-100 choice (its IF-10 one grows, checked below)
  windows = {}
  for method in ("mtt", "datm", "ltdd"):
    config.method = method
    window = specs.distill_spec(config, specs.method(config)).window
    windows[method] = [window.at(it) for it in (0, 2, 100)]
  assert windows["ltdd"] == windows["mtt"] == [(0, 3)] * 3
  assert windows["datm"] == [(0, 1), (0, 2), (0, 3)]
  config.method, config.ltdd.grow_window = "ltdd", True
  assert specs.distill_spec(config, specs.method(config)).window.at(0) == (0, 1)


def test_window_floor_applies_with_and_without_growth():
  """DATM draws start epochs from [min_start, upper) whether or not the upper bound grows (its
  CIFAR-100 IPC-50 config: [20, 70) without growth)."""
  fixed = distill.StartWindow(70, grows=False, min_start=20)
  assert fixed.at(0) == fixed.at(5000) == (20, 70)
  grown = distill.StartWindow(50, grows=True, min_start=0, initial_max_start=30, grow_every=100)
  assert [grown.at(it) for it in (0, 99, 100, 1999, 2000, 9999)] == [
      (0, 30), (0, 30), (0, 31), (0, 49), (0, 50), (0, 50)]


def test_ed_classifier_term_unweighted_from_epoch_zero(tiny):
  """LTDD's classifier term: start at classifier epoch 0, target expert_epochs later, no DAM
  weights in its inner loss, weighted against the backbone term by the ED weights."""
  config, data, expert_set = tiny
  config = config.copy_and_resolve_references()
  config.method = "ltdd"
  objective, init = _objective(config, data, expert_set)
  k_pairs = [objective.sample(np.random.default_rng(s), 0, 3, 1) for s in range(4)]
  for pair in k_pairs:  # classifier window [0, 1): the start is epoch 0 of some expert
    starts = [objective.classifier_experts.get(k, 0) for k in range(objective.num_experts)]
    assert any(all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(pair["cls_start"]),
                                                        jax.tree.leaves(s))) for s in starts)
  head_only = dataclasses.replace(objective, ed=distill.EDSpec(0.0, 1.0))
  reweighted = dataclasses.replace(head_only, student=dataclasses.replace(
      objective.student, class_weights=objective.student.class_weights[::-1] * 5))
  args = ({**_syn(init), "lr": jnp.float32(0.1)}, k_pairs[0], jax.random.key(0))
  np.testing.assert_array_equal(head_only.loss(*args), reweighted.loss(*args))
  weighted = dataclasses.replace(reweighted, ed=distill.EDSpec(0.0, 1.0, dam=True))
  assert weighted.loss(*args) != reweighted.loss(*args)  # the switch does reach the term
  both = objective.loss(*args)
  backbone = dataclasses.replace(objective, ed=distill.EDSpec(1.0, 0.0)).loss(*args)
  weights = config.ltdd.backbone_weight, config.ltdd.classifier_weight
  assert weights == (1.0, 0.2)  # digits is IF 10: LTDD's IF-10 weights
  np.testing.assert_allclose(both, weights[0] * backbone + weights[1] * head_only.loss(*args),
                             rtol=1e-5)
