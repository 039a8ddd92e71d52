import dataclasses
import json
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ltdd_jax import checkpoints, distill, experts, matching, parallel


def _objective(config, data, expert_set, tmp_path=None):
  classifier_set = None
  if distill.method_options(config).ed:
    classifier_set = experts.classifier_experts(config, data, expert_set, parallel.make_mesh(1))
  return (distill.flat_objective(config, data, expert_set, classifier_set),
          distill.initial_synthetic(config, data, expert_set, classifier_set))


@pytest.mark.parametrize("method", ["mtt", "ltdd"])
def test_resume_is_bitwise_identical(tiny, tmp_path, method):
  config, data, expert_set = tiny
  config = config.copy_and_resolve_references()
  config.method = method
  objective, init = _objective(config, data, expert_set)
  full = distill.run_distillation(config, data, [objective], [1.0], init, tmp_path / "full")
  half = config.copy_and_resolve_references()
  half.distill.iterations = 3  # "crash" after the checkpoint at iteration 3 ...
  distill.run_distillation(half, data, [objective], [1.0], init, tmp_path / "resumed")
  resumed = distill.run_distillation(config, data, [objective], [1.0], init, tmp_path / "resumed")
  assert set(full) == set(resumed)
  for k in full:
    np.testing.assert_array_equal(full[k], resumed[k])
  assert not np.array_equal(full["images"], init["images"])
  if method == "ltdd":
    assert "label_logits" in full and not np.array_equal(full["label_logits"], init["label_logits"])


def test_four_devices_equal_one(tiny, tmp_path):
  config, data, expert_set = tiny
  config = config.copy_and_resolve_references()
  config.distill.iterations = 2
  objective, init = _objective(config, data, expert_set)
  out = [distill.run_distillation(config, data, [objective], [1.0], init, tmp_path / str(n),
                                  parallel.make_mesh(n)) for n in (1, 4)]
  np.testing.assert_allclose(out[0]["images"], out[1]["images"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out[0]["log_lr"], out[1]["log_lr"], rtol=1e-4)


def test_each_objective_learns_its_own_lr(tiny, tmp_path):
  """Several objectives (the hierarchical stages) get one learned lr each, moved by their own loss
  only; with distill.lr_per_objective off they share one."""
  config, data, expert_set = tiny
  config = config.copy_and_resolve_references()
  config.distill.iterations = 3
  objective, init = _objective(config, data, expert_set)
  slow = dataclasses.replace(objective, name="slow")
  out = distill.run_distillation(config, data, [objective, slow], [1.0, 0.0], init,
                                 tmp_path / "own")
  chex.assert_shape(out["log_lr"], (2,))
  assert out["log_lr"][1] == init["log_lr"], "a zero-weight objective's lr must not move"
  assert out["log_lr"][0] != init["log_lr"]
  distill.save_synthetic(tmp_path / "own", out, data, config, ["flat", "slow"])
  syn = distill.load_synthetic(tmp_path / "own" / "synthetic.npz")
  lrs = distill.synthetic_lrs(config, syn)
  assert list(lrs) == ["flat", "slow"]
  np.testing.assert_allclose(lrs["slow"], config.distill.syn_lr_init, rtol=1e-6)
  config.distill.lr_per_objective = False
  shared = distill.run_distillation(config, data, [objective, slow], [1.0, 0.0], init,
                                    tmp_path / "shared")
  chex.assert_shape(shared["log_lr"], ())


def test_thirty_iterations_lower_the_matching_loss(tiny, tmp_path):
  config, data, expert_set = tiny
  config = config.copy_and_resolve_references()
  config.distill.iterations = 30
  config.distill.checkpoint_every = 30
  objective, init = _objective(config, data, expert_set)
  spec = matching.InnerSpec(config.distill.syn_steps, config.distill.batch_syn)
  rng = np.random.default_rng(123)
  probes = [objective.sample(rng, 0, config.distill.max_start_epoch, 1) for _ in range(6)]

  @jax.jit
  def probe_loss(syn):
    return jnp.mean(jnp.stack([
        objective.loss(spec, config.dsa, syn["images"], distill.targets_of(syn),
                       jnp.exp(syn["log_lr"]), p, jax.random.key(i)) for i, p in enumerate(probes)]))

  before = float(probe_loss(init))
  after = float(probe_loss(distill.run_distillation(config, data, [objective], [1.0], init,
                                                    tmp_path)))
  assert after < before, (before, after)


def test_divergence_stops_with_message_and_loadable_checkpoint(tiny, tmp_path):
  config, data, expert_set = tiny
  config = config.copy_and_resolve_references()
  config.distill.lr_img = 1e30
  config.distill.iterations = 6
  objective, init = _objective(config, data, expert_set)
  with pytest.raises(distill.DivergenceError, match="diverged.*lr_img"):
    distill.run_distillation(config, data, [objective], [1.0], init, tmp_path)
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
    distill.check_epochs(config, [objective])
  config.method = "dc"
  with pytest.raises(ValueError, match="Unknown distillation method 'dc'"):
    distill.method_options(config)


def test_pipeline_cli_end_to_end(tmp_path):
  cmd = [sys.executable, "-m", "launch.pipeline", "--config=configs/digits_lt.py",
         f"--workdir={tmp_path}", f"--config.data.cache_dir={tmp_path}/cache",
         "--config.model.width=8", "--config.experts.num_experts=2", "--config.experts.epochs=3",
         "--config.experts.batch_size=128", "--config.distill.batch_syn=20",
         "--config.distill.ipc=2", "--config.distill.syn_steps=3", "--config.distill.iterations=4",
         "--config.distill.max_start_epoch=2", "--config.distill.expert_epochs=1",
         "--config.evaluate.epochs=3", "--config.evaluate.num_models=2",
         "--config.method=mtt+hierarchical"]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("config.json", "metrics.jsonl", "synthetic.npz", "synthetic.png", "report.json",
               "report_per_class.png", "grouping.json"):
    assert (tmp_path / name).exists(), name
  report = json.loads((tmp_path / "report.json").read_text())
  assert report["method"] == "mtt+hierarchical" and report["ipc"] == 2
  assert report["num_images"] == 20  # the flat budget: C x IPC
  assert report["classifier"] == "two_stage_soft" and 0 <= report["group_acc"] <= 100
  groups = json.loads((tmp_path / "grouping.json").read_text())["groups"]
  assert len(groups) > 1
  losses = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()
            if json.loads(line)["stage"] == "distill"]
  assert len(losses[-1]["losses"]) == 1 + sum(len(g) > 1 for g in groups)  # stage 1 + stage 2
  with np.load(tmp_path / "synthetic.npz") as syn:
    assert syn["images"].shape == (20, 8, 8, 1) and syn["pixels"].shape == (20, 8, 8, 1)
    assert syn["labels"].shape == (20,)
    # One learned lr per objective; each two-stage network trains with its own.
    names = ["groups"] + [f"group_{g}" for g, c in enumerate(groups) if len(c) > 1]
    assert list(syn["lr_objectives"]) == names and (syn["lr"] > 0).all()
  assert sorted(report["learned_lrs"]) == sorted(names)
  stages = [json.loads(line)["stage"] for line in (tmp_path / "metrics.jsonl").open()]
  assert "distill" in stages and "evaluate" in stages
