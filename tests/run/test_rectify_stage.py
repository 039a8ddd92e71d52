"""The +rectify plugin through the stage layer: distilled sets, existing sets, the two-stage
classifier, the validation-split choice and the initial labels."""

import dataclasses
import json
import pathlib

import numpy as np
import pytest

from configs import benchmark as benchmark_config

from ltdd_jax import errors
from ltdd_jax.methods import rectify, registry, synthetic
from ltdd_jax.run import benchmark, pipeline, specs


def _config(tiny, method, **rectify):
  config, data, expert_set = tiny
  config = config.copy_and_resolve_references()
  config.method = method
  config.experts.directory = str(expert_set.directory.parent)  # the shared tiny experts
  config.rectify.update(rectify)
  return config, data, expert_set


def _soft_set(config, data, expert_set):
  """A set with expert soft labels, as initialisation makes it (no distillation)."""
  init_spec = specs.init_spec(config, specs.method(config))
  state, record = synthetic.initial_synthetic(init_spec, data, expert_set)
  return synthetic.DistilledSet.from_state(state, (), record)


def test_plugin_needs_soft_labels_and_rectifying_at_init_changes_the_distillation():
  with pytest.raises(errors.InputError, match=r"\+rectify acts on soft labels.*datm, ltdd"):
    registry.parse("mtt+rectify")
  method = registry.parse("ltdd+hierarchical+rectify")
  assert method.rectifies and method.two_stage and method.distillation == "ltdd+hierarchical"
  init = registry.parse("datm+rectify", rectify_at="init")
  assert init.distillation == "datm+rectify" and "rectify" in init.distills_with
  assert "rectify" not in registry.parse("datm+rectify").distills_with
  # A grid's rectified cell evaluates its base cell's set.
  assert benchmark.distilling_cell(pathlib.Path("W"), 10.0, 2,
                                   "datm+two_stage+rectify").name == "if10_ipc2_datm"
  grid = benchmark_config.get_config("dataset=digits")
  grid.rectify.at = "both"
  assert benchmark.distilling_cell(pathlib.Path("W"), 10.0, 2, "datm+rectify", grid) is None


def test_an_existing_set_is_rectified_at_evaluation_and_keeps_its_learned_labels(tiny, tmp_path):
  config, data, expert_set = _config(tiny, "datm+rectify")
  syn = _soft_set(config, data, expert_set)
  path = syn.save(tmp_path / "set", data.preprocessor, "soft", per_class=2)
  ctx = pipeline.setup(config, tmp_path / "eval", stages=())
  report = pipeline.stage_evaluate(ctx, f"synthetic:{path}")
  record = report["rectify"]
  assert record["mode"] == "adsa" and record["spread_after"] <= record["spread_before"]
  assert len(record["own_before"]) == data.num_classes
  lines = [json.loads(l) for l in (tmp_path / "eval" / "metrics.jsonl").open()]
  assert [l["tau"] for l in lines if l["stage"] == "rectify"] == [record["tau"]]
  # Saved rectified, read back: the learned labels are still there, beside the rectified ones.
  rectified = pipeline.rectify_set(ctx, syn, False)
  again = rectified.save(tmp_path / "saved", data.preprocessor, "soft", per_class=2)
  loaded = synthetic.DistilledSet.load(again, data.num_classes, data.image_shape)
  np.testing.assert_array_equal(loaded.soft_labels, syn.soft_labels)
  np.testing.assert_array_equal(loaded.targets(), rectified.rectified_labels)
  assert loaded.rectify_record == rectified.rectify_record
  # Without +rectify the same file is evaluated on its learned labels.
  plain = dataclasses.replace(ctx, config=_config(tiny, "datm")[0],
                              specs=specs.Specs.from_config(_config(tiny, "datm")[0]))
  assert "rectify" not in pipeline.stage_evaluate(plain, f"synthetic:{again}")
  zero = dataclasses.replace(ctx, specs=dataclasses.replace(
      ctx.specs, rectify=rectify.RectifySpec(mode="fixed", tau=0.0)))
  np.testing.assert_array_equal(pipeline.rectify_set(zero, syn, False).targets(), syn.soft_labels)
  with pytest.raises(errors.InputError, match="this set has none"):
    pipeline.rectify_set(ctx, dataclasses.replace(syn, label_logits=None, soft_labels=None), False)


def test_two_stage_rectifies_group_and_within_group_targets_in_their_own_spaces(tiny, tmp_path):
  config, data, expert_set = _config(tiny, "datm+two_stage+rectify")
  ctx = pipeline.setup(config, tmp_path / "run", stages=())
  syn = pipeline.rectify_set(ctx, _soft_set(config, data, expert_set), True)
  report = pipeline.stage_evaluate(ctx, "synthetic", True, syn=syn)
  stages = report["rectify_stages"]
  assert report["rectify"]["applied_to"] == "stages"  # not the flat rectified labels
  groups = json.loads((tmp_path / "run" / "grouping.json").read_text())["groups"]
  assert set(stages) == {"groups"} | {f"group_{g}" for g, c in enumerate(groups) if len(c) > 1}
  assert len(stages["groups"]["own_before"]) == len(groups)
  for name, record in stages.items():
    assert record["spread_after"] <= record["spread_before"] + 1e-9, name


def test_validation_choice_never_reads_the_test_split(tiny, tmp_path):
  config, data, expert_set = _config(tiny, "datm+rectify", mode="validation",
                                     validation_taus=(0.0, 1.0))
  syn = _soft_set(config, data, expert_set)
  poisoned = dataclasses.replace(data, test_images=np.full_like(data.test_images, np.nan),
                                 test_labels=np.zeros_like(data.test_labels))
  chosen = []
  for name, held in (("clean", data), ("poisoned", poisoned)):
    ctx = pipeline.setup(config, tmp_path / name, data=held, stages=())
    chosen.append(pipeline.rectify_set(ctx, syn, False).rectify_record)
  assert chosen[0]["validation_scores"] == chosen[1]["validation_scores"]
  assert chosen[0]["tau"] == chosen[1]["tau"] in (0.0, 1.0)

  # The choice resumes from its file: no candidate is evaluated again.
  ctx = pipeline.setup(config, tmp_path / "clean", data=data, stages=())
  before = (tmp_path / "clean" / "metrics.jsonl").read_text()
  assert pipeline.rectify_set(ctx, syn, False).rectify_record["tau"] == chosen[0]["tau"]
  assert "rectify_validation" not in (tmp_path / "clean" / "metrics.jsonl").read_text()[len(before):]


def test_rectifying_at_init_shifts_the_initial_logits_by_the_log_prior(tiny, tmp_path):
  config, data, expert_set = _config(tiny, "datm+rectify", at="init", mode="fixed", tau=1.5)
  ctx = pipeline.setup(config, tmp_path / "run", stages=())
  init, _ = synthetic.initial_synthetic(ctx.specs.init, data, expert_set)
  out = pipeline.rectify_initial(ctx, init)
  prior = np.log(data.counts / data.counts.sum())
  np.testing.assert_allclose(out["label_logits"], init["label_logits"] - 1.5 * prior[None],
                             rtol=1e-5, atol=1e-5)
  assert not pipeline.rectifies_final(ctx)
  assert '"stage": "rectify_init"' in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_pipeline_saves_the_rectified_set_beside_its_learned_labels(tiny, tmp_path):
  config, data, _ = _config(tiny, "datm+rectify")
  config.experts.directory = ""  # its own experts, trained with their record
  config.distill.iterations, config.evaluate.epochs = 2, 2
  report = pipeline.run_pipeline(config, tmp_path / "run")
  with np.load(tmp_path / "run" / "synthetic.npz") as f:
    soft, rectified = f["soft_labels"], f["rectified_soft_labels"]
    assert json.loads(str(f["rectify_record"]))["tau"] == report["rectify"]["tau"]
  assert soft.shape == rectified.shape == (20, data.num_classes)
  np.testing.assert_allclose(rectified.sum(-1), 1.0, rtol=1e-5)
  if report["rectify"]["tau"] > 0:
    assert not np.allclose(soft, rectified)
