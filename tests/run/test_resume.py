"""Resuming a workdir never mixes runs: stage records, mismatch errors, no duplicated metrics."""

import json

import numpy as np
import pytest

from conftest import tiny_config
from ltdd_jax import errors, reporting
from ltdd_jax.methods import registry
from ltdd_jax.run import pipeline, resume


@pytest.mark.parametrize("stage,change,keys", [
    ("experts", {"seed": 1, "experts.epochs": 3}, ["experts.epochs", "seed"]),
    ("experts", {"model.init": "flax"}, ["model.init"]),
    ("distill", {"distill.ipc": 5}, ["distill.ipc"]),
    ("distill", {"method": "datm"}, ["method"]),
])
def test_mismatched_record_names_the_keys(tmp_path, stage, change, keys):
  config = tiny_config(tmp_path)
  directory = tmp_path / stage
  resume.claim(config, directory, stage)
  assert resume.check(config, directory, stage)
  changed = config.copy_and_resolve_references()
  changed.update_from_flattened_dict(change)
  with pytest.raises(errors.ResumeMismatchError) as info:
    resume.claim(changed, directory, stage)
  for key in keys:
    assert f"{key}: " in str(info.value)
  assert f"--config.discard_mismatched={stage}" in str(info.value)
  changed.discard_mismatched = stage
  (directory / "data").mkdir()
  resume.claim(changed, directory, stage)  # discards the old outputs, records the new values
  assert not (directory / "data").exists() and resume.check(changed, directory, stage)


def test_values_that_do_not_change_results_are_not_recorded(tmp_path):
  config = tiny_config(tmp_path)
  resume.claim(config, tmp_path / "d", "distill")
  longer = config.copy_and_resolve_references()
  longer.distill.iterations, longer.distill.log_every = 100, 7  # extending a run is a resume
  longer.model.conv_impl, longer.method = "xla", "mtt+two_stage"
  longer.evaluate.epochs = 1
  assert resume.check(longer, tmp_path / "d", "distill")
  resume.claim(config, tmp_path / "e", "experts")
  other_method = config.copy_and_resolve_references()
  other_method.method, other_method.distill.ipc = "ltdd", 7  # experts are shared across methods
  assert resume.check(other_method, tmp_path / "e", "experts")
  # Which hierarchical objectives use LTDD's ED matters to ltdd only.
  for method, recorded in (("mtt+hierarchical", False), ("ltdd+hierarchical", True)):
    hier = config.copy_and_resolve_references()
    hier.method = method
    assert ("grouping.ed_min_imbalance" in resume.stage_values(hier, "distill")) == recorded


def test_pipeline_resume_with_other_values_fails_before_work(tmp_path):
  config = tiny_config(tmp_path)
  config.distill.iterations = 3
  pipeline.run_pipeline(config, tmp_path / "run")
  saved = (tmp_path / "run" / "config.json").read_text()
  metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
  for key, value in (("distill.ipc", 3), ("seed", 1)):
    changed = config.copy_and_resolve_references()
    changed.update_from_flattened_dict({key: value})
    with pytest.raises(errors.ResumeMismatchError, match=key):
      pipeline.run_pipeline(changed, tmp_path / "run")
    assert (tmp_path / "run" / "config.json").read_text() == saved
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics
  # Asked for explicitly, the distillation starts afresh on the experts it still matches.
  changed = config.copy_and_resolve_references()
  changed.distill.ipc, changed.discard_mismatched = 3, "distill"
  report = pipeline.run_pipeline(changed, tmp_path / "run")
  assert report["ipc"] == 3 and report["num_images"] == 30
  assert json.loads((tmp_path / "run" / "config.json").read_text())["distill"]["ipc"] == 3
  stages = [json.loads(line)["stage"] for line in (tmp_path / "run" / "metrics.jsonl").open()]
  assert stages.count("experts") == 1, "a finished expert set is not logged again"


def test_metrics_lines_are_not_repeated_after_resume(tmp_path):
  writer = reporting.MetricsWriter(tmp_path)
  for step in (1, 2, 3, 4):
    writer.write("distill", step, loss=float(step))
  writer.write("experts", 10)
  writer.drop_after(("distill",), 2)  # resumed from the checkpoint at iteration 2
  for step in (3, 4):
    writer.write("distill", step, loss=float(step))
  writer.write_once("label_init", 0, acc=[1.0])
  writer.write_once("label_init", 0, acc=[1.0])
  steps = [(r["stage"], r["step"]) for r in writer.lines()]
  assert steps == [("distill", 1), ("distill", 2), ("experts", 10), ("distill", 3),
                   ("distill", 4), ("label_init", 0)]


def test_baseline_reports_do_not_overwrite_each_other(tmp_path):
  config = tiny_config(tmp_path)
  ctx = pipeline.setup(config, tmp_path / "run", stages=())
  for which in ("random", "full"):
    pipeline.stage_evaluate(ctx, which)
  names = sorted(p.name for p in (tmp_path / "run").glob("report*.json"))
  assert names == ["report_full.json", "report_random.json"]
  assert pipeline.report_name(registry.parse(config.method), "synthetic", "test") == "report"
  assert pipeline.report_name(registry.parse("random"), "random", "validation") == "validation_report"
  report = json.loads((tmp_path / "run" / "report_random.json").read_text())
  assert report["method"] == "random" and report["repeated_classes"] == []


def test_preprocessing_fit_is_cached(tmp_path, monkeypatch):
  from ltdd_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  config = tiny_config(tmp_path)
  config.data.zca = True
  first = pipeline.load_dataset(config)
  def refit(*args, **kwargs):
    raise AssertionError("the fitted preprocessing should come from the cache")
  monkeypatch.setattr(preprocess, "fit_preprocessor", refit)
  again = pipeline.load_dataset(config)
  np.testing.assert_array_equal(first.train_images, again.train_images)
  config.data.zca_eps = 0.5  # another fit: not the cached one
  with pytest.raises(AssertionError, match="from the cache"):
    pipeline.load_dataset(config)


def test_discarding_a_distillation_drops_its_metrics_records(tmp_path):
  config = tiny_config(tmp_path)
  run = tmp_path / "run"
  resume.claim(config, run / "distill_ckpt", "distill")
  writer = reporting.MetricsWriter(run)
  writer.write("experts", 4)
  writer.write_once("label_init", 0, acc=[0.5])
  writer.write("distill", 3, loss=1.0)
  changed = config.copy_and_resolve_references()
  changed.distill.ipc, changed.discard_mismatched = 3, "distill"
  resume.claim(changed, run / "distill_ckpt", "distill")
  assert [r["stage"] for r in writer.lines()] == ["experts"]
  writer.write_once("label_init", 0, acc=[1.0])  # the new run's record is written
  assert writer.lines()[-1]["acc"] == [1.0]


def test_only_what_a_command_resumes_is_checked(tmp_path):
  config = tiny_config(tmp_path)
  run, experts_root = tmp_path / "run", tmp_path / "run" / "experts"
  datm = config.copy_and_resolve_references()
  datm.method = "datm"
  resume.claim(datm, run / "distill_ckpt", "distill")
  other = config.copy_and_resolve_references()
  other.experts.classifier_epochs = 7
  resume.claim(other, experts_root / "flat_classifier", "experts", classifier=True)
  with pytest.raises(errors.ResumeMismatchError, match="method: 'datm' -> 'mtt'"):
    resume.check_workdir(config, run, experts_root)  # an mtt run here would resume datm's
  pipeline.setup(config, run, stages=())  # evaluating a set resumes nothing
  config.method = "random"
  resume.check_workdir(config, run, experts_root)  # a baseline resumes no distillation
  ltdd = datm.copy_and_resolve_references()
  ltdd.method = "ltdd"
  resume.claim(ltdd, tmp_path / "l" / "distill_ckpt", "distill")
  resume.check_workdir(ltdd.copy_and_resolve_references(), tmp_path / "l", tmp_path / "none")
  with pytest.raises(errors.ResumeMismatchError, match="experts.classifier_epochs"):
    resume.check_workdir(ltdd, tmp_path / "l", experts_root)  # ED uses the classifier set
  mtt = config.copy_and_resolve_references()
  mtt.method = "mtt"
  resume.claim(mtt, tmp_path / "m" / "distill_ckpt", "distill")
  mtt.experts.classifier_epochs, mtt.ltdd.backbone_weight = 7, 0.1  # unused by mtt
  resume.check_workdir(mtt, tmp_path / "m", tmp_path / "m" / "experts")
  hier = config.copy_and_resolve_references()
  hier.method = "mtt+hierarchical"
  resume.claim(hier, tmp_path / "h", "distill")
  hier.grouping.prediction = "hard"  # evaluation only
  assert resume.check(hier, tmp_path / "h", "distill")


def test_outputs_without_a_record_are_never_adopted(tmp_path):
  config = tiny_config(tmp_path)
  reporting.write_json(tmp_path / "old" / "meta.json", {"num_experts": 2, "epochs": 4})
  with pytest.raises(errors.ResumeMismatchError, match="without a record"):
    resume.claim(config, tmp_path / "old", "experts")
  assert not (tmp_path / "old" / resume.RECORD).exists()
  resume.claim(config, tmp_path / "new", "experts")  # an empty or missing folder is claimed
  assert json.loads((tmp_path / "new" / resume.RECORD).read_text())["stage"] == "experts"


def test_a_command_checks_only_the_stages_it_reads(tmp_path):
  """The grouping analysis reads the experts alone: a hierarchical distillation in its workdir
  is no reason to refuse, nor to propose discarding it."""
  hier = tiny_config(tmp_path)
  hier.method = "mtt+hierarchical"
  run = tmp_path / "run"
  resume.claim(hier, run / "distill_ckpt", "distill")
  mtt = tiny_config(tmp_path)
  with pytest.raises(errors.ResumeMismatchError, match="discard_mismatched=distill"):
    pipeline.setup(mtt, run)  # a pipeline would resume that distillation: it must refuse
  ctx = pipeline.setup(mtt, run, stages=("experts",))  # what launch.analyze_groups checks
  assert ctx.method.name == "mtt"


def test_a_record_from_before_a_key_existed_stands_for_its_old_value(tmp_path):
  config = tiny_config(tmp_path)
  directory = tmp_path / "experts"
  resume.claim(config, directory, "experts")
  record = json.loads((directory / resume.RECORD).read_text())
  del record["values"]["data.validation_from"]  # written before the key existed
  (directory / resume.RECORD).write_text(json.dumps(record))
  assert resume.check(config, directory, "experts")  # it was made with the old value, "pool"
  changed = config.copy_and_resolve_references()
  changed.data.validation_from = "leftover"
  with pytest.raises(errors.ResumeMismatchError, match="data.validation_from: 'pool' -> 'leftover'"):
    resume.check(changed, directory, "experts")
