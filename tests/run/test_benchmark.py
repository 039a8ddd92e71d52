import json
import subprocess
import sys

import numpy as np
import pytest

from ltdd_jax import errors
from ltdd_jax.methods import distill
from ltdd_jax.run import benchmark, pipeline
from conftest import CLI_DSA


def test_benchmark_grid_runs_resumes_and_tabulates(tmp_path):
  cmd = [sys.executable, "-m", "launch.benchmark", "--config=configs/benchmark.py:dataset=digits", CLI_DSA,
         f"--workdir={tmp_path}", f"--config.data.cache_dir={tmp_path}/cache",
         "--config.model.width=4", "--config.benchmark.ipcs=(2,)",
         "--config.benchmark.methods=('random','random+two_stage')",
         "--config.evaluate.epochs=2", "--config.evaluate.full_epochs=1",
         "--config.evaluate.num_models=1"]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  table, summary = (tmp_path / "results.md").read_text().split("\n\n")
  table = table.splitlines()
  # header, rule, full, random, and random+two_stage's three classifiers (one cell)
  assert len(table) == 2 + 5
  assert [line.split(" | ")[2] for line in table[-3:]] == [  # the cell's own classifier first
      f"random+two_stage [{name}]" for name in ("shared", "flat", "separate")]
  # The two-stage cell's flat network is the flat cell's: same set, same seed, same figures.
  assert table[-2].split(" | ")[4:11] == table[-4].split(" | ")[4:11]
  assert summary.startswith("3 of 3 cells finished; sum of cell wall times")
  two_stage = json.loads((tmp_path / "if10_ipc2_random-two_stage" / "report.json").read_text())
  assert "group_acc" in two_stage and "within_group_acc" in two_stage
  assert (tmp_path / "accuracy_heatmap.png").exists() and (tmp_path / "per_class_if10.png").exists()
  assert (tmp_path / "summary.md").read_text().splitlines()[2].startswith("| whole LT set | ")
  report = tmp_path / "if10_ipc2_random" / "report.json"
  before = report.stat().st_mtime_ns
  again = subprocess.run(cmd, capture_output=True, text=True)
  assert again.returncode == 0
  assert report.stat().st_mtime_ns == before, "a finished cell must not run again"
  assert "[benchmark] cell" not in again.stdout


def test_two_stage_cell_reuses_the_base_distillation(tmp_path):
  from ltdd_jax.run import benchmark  # pylint: disable=g-import-not-at-top
  base = tmp_path / benchmark.cell_name(10.0, 2, "mtt")
  (base / "distill_ckpt" / "200").mkdir(parents=True)
  cell = tmp_path / benchmark.cell_name(10.0, 2, "mtt+two_stage")
  benchmark.reuse_distillation(
      benchmark.distilling_cell(tmp_path, 10.0, 2, "mtt+two_stage"), cell)
  assert not (cell / "distill_ckpt").exists(), "an unfinished base cell is not reused"
  (base / "synthetic.npz").write_bytes(b"")
  benchmark.reuse_distillation(
      benchmark.distilling_cell(tmp_path, 10.0, 2, "mtt+two_stage"), cell)
  assert (cell / "distill_ckpt" / "200").is_dir()
  other = tmp_path / benchmark.cell_name(10.0, 2, "mtt+hierarchical")
  benchmark.reuse_distillation(
      benchmark.distilling_cell(tmp_path, 10.0, 2, "mtt+hierarchical"), other)
  assert not other.exists()


def test_cells_take_their_factor_and_ipc_settings(tmp_path):
  import pytest  # pylint: disable=g-import-not-at-top
  from configs import benchmark as benchmark_config  # pylint: disable=g-import-not-at-top
  from ltdd_jax import errors  # pylint: disable=g-import-not-at-top
  from ltdd_jax.run import benchmark  # pylint: disable=g-import-not-at-top
  config = benchmark_config.get_config("profile=paper")
  one = benchmark.cell_config(config, 100.0, 1, "ltdd", tmp_path)
  fifty = benchmark.cell_config(config, 10.0, 50, "ltdd", tmp_path)
  assert (one.distill.max_start_epoch, one.distill.lr_lr, one.datm.lr_label) == (4, 1e-7, 5.0)
  assert (fifty.distill.max_start_epoch, fifty.distill.lr_img) == (40, 1000.0)
  assert (one.ltdd.backbone_weight, one.ltdd.grow_window) == (0.5, False)  # IF 100
  assert (fifty.ltdd.backbone_weight, fifty.ltdd.grow_window) == (1.0, True)  # IF 10
  with pytest.raises(errors.InputError, match="no settings for if5"):
    benchmark.cell_config(config, 5.0, 10, "mtt", tmp_path)


def test_table_shows_the_learned_lr_of_distilled_sets_only():
  from ltdd_jax.run import benchmark  # pylint: disable=g-import-not-at-top
  assert benchmark.learned_lr({"lr": 0.036084}, "mtt") == "0.0361"
  assert benchmark.learned_lr({"lr": 0.01}, "random+two_stage") is None  # the protocol's lr
  hierarchical = {"lr": 0.04, "learned_lrs": {"groups": 0.0413, "group_0": 0.0473}}
  assert benchmark.learned_lr(hierarchical, "ltdd+hierarchical") == "groups 0.0413 / group_0 0.0473"
  row = {"imbalance_factor": 100.0, "ipc": 10, "method": "mtt", "images": 100,
         "test_acc_mean": 30.0, "test_acc_std": 1.0, "many_acc": 50.0, "medium_acc": 25.0,
         "few_acc": 10.0, "per_class_acc_std": 20.0, "head_tail_gap": 40.0,
         "pred_kl_uniform": 0.1, "group_acc": None, "within_group_acc": None,
         "learned_lr": "0.0361"}
  header, rule, line = benchmark.markdown_table([row]).splitlines()
  assert header.endswith("| learned lr | teacher keeps (%) |")
  assert rule.count("|") == line.count("|") == 16
  assert line.endswith("| 0.0361 | - |")  # `fixed`: no teacher
  relabelled = benchmark.markdown_table([{**row, "teacher_set_acc": 52.0}]).splitlines()[2]
  assert relabelled.endswith("| 0.0361 | 52.0 |")


def test_summary_puts_each_method_in_one_row_with_the_published_figure_beside():
  def row(factor, ipc, method, acc, dataset="cifar10_lt"):
    return {"dataset": dataset, "imbalance_factor": factor, "ipc": ipc, "method": method,
            "test_acc_mean": acc, "test_acc_std": 0.5}
  rows = [row(100.0, None, "full", 44.1), row(100.0, 10, "mtt", 34.5),
          row(100.0, 10, "mtt@relabel", 30.0), row(100.0, 1, "mtt", 28.9),
          row(10.0, 10, "mtt", 46.1)]
  header, rule, full, mtt, relabel, _, note = benchmark.summary_table(rows).splitlines()
  assert header == "| method | IF 100 IPC 10 | IF 100 IPC 1 | IF 10 IPC 10 |"
  assert rule.count("|") == full.count("|") == mtt.count("|") == 5
  # The whole set shows under each IPC of its own factor only; no published MTT at IPC 1.
  assert full == "| whole LT set | 44.1 +- 0.5 | 44.1 +- 0.5 | - |"
  assert mtt == "| mtt | 34.5 +- 0.5 (37.7 +- 0.6) | 28.9 +- 0.5 | 46.1 +- 0.5 (58.0 +- 0.8) |"
  assert relabel == "| mtt@relabel | 30.0 +- 0.5 | - | - |"  # not the papers' protocol
  assert note.startswith("(x): the published figure")
  digits = benchmark.summary_table([row(10.0, 10, "mtt", 90.0, "digits_lt")])
  assert "(" not in digits and digits.count("\n") == 3
  # A two-stage cell's classifiers are rows of their own; an accuracy-less row shows "-".
  two_stage = [row(100.0, 10, "mtt+two_stage [shared]", 31.7),
               {**row(100.0, 10, "mtt+two_stage [flat]", 34.5), "extra": True},
               row(100.0, 10, "mtt", None)]
  lines = benchmark.summary_table(two_stage).splitlines()
  assert lines[2:5] == ["| mtt+two_stage [shared] | 31.7 +- 0.5 |",
                        "| mtt+two_stage [flat] | 34.5 +- 0.5 |", "| mtt | - (37.7 +- 0.6) |"]
  assert benchmark.summary_table([row(100.0, None, "full", 44.1)]) == ""


@pytest.mark.parametrize("error", benchmark.CELL_ERRORS)
def test_a_diverging_cell_is_recorded_and_the_grid_goes_on(tmp_path, monkeypatch, error):
  from configs import benchmark as benchmark_config  # pylint: disable=g-import-not-at-top
  config = benchmark_config.get_config("dataset=digits")
  config.data.cache_dir = str(tmp_path / "cache")
  config.benchmark.ipcs = (1, 2)
  config.benchmark.methods = ("random", "mtt", "mtt+two_stage")
  ran = []
  def fake_run(cell_config, workdir, data=None):
    ran.append(workdir.name)
    workdir.mkdir(parents=True, exist_ok=True)
    if workdir.name == "if10_ipc1_mtt" and diverge:
      raise error("loss became nan at iteration 7")
    report = {"method": cell_config.method, "ipc": cell_config.distill.ipc, "test_acc_mean": 50.0,
              "test_acc_std": 1.0, "wall_seconds": 2.0, "num_images": 10}
    (workdir / "report.json").write_text(json.dumps(report))
  monkeypatch.setattr(pipeline, "run_pipeline", fake_run)
  diverge = True
  with pytest.raises(benchmark.CellsDivergedError, match="if10_ipc1_mtt") as raised:
    benchmark.run_grid(config, tmp_path)
  # The cells after the failed one still ran; the two-stage cell evaluates the failed cell's
  # distillation, so it is marked failed too when that diverged, and runs when only its
  # evaluation did.
  distill_failed = error is distill.DivergenceError
  assert ran == ["if10_full", "if10_ipc1_random", "if10_ipc1_mtt"] + (
      [] if distill_failed else ["if10_ipc1_mtt-two_stage"]) + [
      "if10_ipc2_random", "if10_ipc2_mtt", "if10_ipc2_mtt-two_stage"]
  assert "nan at iteration 7" in (tmp_path / "if10_ipc1_mtt" / "failed.txt").read_text()
  assert ("if10_ipc1_mtt-two_stage" in str(raised.value)) == distill_failed
  results = (tmp_path / "results.md").read_text()
  finished = 5 if distill_failed else 6
  assert f"{finished} of 7 cells finished" in results
  assert "Diverged (see each cell's failed.txt): if10_ipc1_mtt" in results
  ran.clear()
  diverge = False  # e.g. after lowering its image lr: only the failed cells run again
  benchmark.run_grid(config, tmp_path)
  assert ran == ["if10_ipc1_mtt"] + (["if10_ipc1_mtt-two_stage"] if distill_failed else [])
  assert not (tmp_path / "if10_ipc1_mtt" / "failed.txt").exists()
  results = (tmp_path / "results.md").read_text()
  assert "7 of 7 cells finished" in results and "Diverged" not in results
  # Experts are shared by a factor's cells: their divergence stops the grid at once.
  def experts_diverge(cell_config, workdir, data=None):
    raise errors.DivergedError("expert training loss became nan at epoch 3")
  monkeypatch.setattr(pipeline, "run_pipeline", experts_diverge)
  (tmp_path / "if10_ipc2_mtt" / "report.json").unlink()
  with pytest.raises(errors.DivergedError, match="expert training"):
    benchmark.run_grid(config, tmp_path)
  assert not (tmp_path / "if10_ipc2_mtt" / "failed.txt").exists()


def test_records_let_a_fresh_workdir_run_only_the_cells_they_lack(tmp_path, monkeypatch):
  from configs import benchmark as benchmark_config  # pylint: disable=g-import-not-at-top
  from ltdd_jax import reporting  # pylint: disable=g-import-not-at-top
  config = benchmark_config.get_config("dataset=digits")
  config.data.cache_dir = str(tmp_path / "cache")
  config.benchmark.ipcs = (1,)
  config.benchmark.methods = ("random", "mtt")
  config.benchmark.records = str(tmp_path / "records")
  ran = []
  def fake_run(cell_config, workdir, data=None):
    ran.append(workdir.name)
    workdir.mkdir(parents=True, exist_ok=True)
    reporting.write_json(workdir / "config.json", cell_config.to_dict())
    report = {"method": cell_config.method, "ipc": cell_config.distill.ipc,
              "test_acc_mean": 40.0 + len(ran), "test_acc_std": 1.0, "wall_seconds": 2.0,
              "num_images": 10}
    (workdir / "report.json").write_text(json.dumps(report))
  monkeypatch.setattr(pipeline, "run_pipeline", fake_run)
  benchmark.run_grid(config, tmp_path / "first")
  assert ran == ["if10_full", "if10_ipc1_random", "if10_ipc1_mtt"]
  for name in ran:
    assert sorted(p.name for p in (tmp_path / "records" / name).iterdir()) == [
        "config.json", "report.json"]
  # A fresh workdir (a new checkout) runs only the row the records lack; the table is the same.
  ran.clear()
  config.benchmark.methods = ("random", "mtt", "herding")
  benchmark.run_grid(config, tmp_path / "second")
  assert ran == ["if10_ipc1_herding"]
  first = (tmp_path / "first" / "results.md").read_text().split("\n\n")[0].splitlines()
  second = (tmp_path / "second" / "results.md").read_text().split("\n\n")[0].splitlines()
  assert second[:len(first)] == first and len(second) == len(first) + 1
  # A record measured with other settings (the iterations a resumed stage may extend included)
  # fails naming them, before any cell runs.
  ran.clear()
  config.distill.iterations += 1
  with pytest.raises(errors.ResumeMismatchError, match="distill.iterations"):
    benchmark.run_grid(config, tmp_path / "third")
  assert ran == []


def test_per_class_figures_for_every_factor_and_100_classes(tmp_path):
  rows = [{"imbalance_factor": f, "ipc": ipc, "method": m, "test_acc_mean": 1.0,
           "per_class_acc": list(np.linspace(80, 10, 100))}
          for f in (10.0, 50.0) for ipc in (1, 10) for m in ("mtt", "mtt+two_stage [shared]")]
  benchmark.write_figures(tmp_path, rows, None)
  for name in ("accuracy_heatmap.png", "per_class_if10.png", "per_class_if50.png"):
    assert (tmp_path / name).stat().st_size > 1000, name


def test_variant_rows_take_their_overrides_and_the_right_base_set(tmp_path, monkeypatch):
  from configs import benchmark as benchmark_config  # pylint: disable=g-import-not-at-top
  config = benchmark_config.get_config("dataset=digits")
  config.data.cache_dir = str(tmp_path / "cache")
  config.benchmark.ipcs = (1,)
  config.benchmark.include_full = False
  config.benchmark.methods = ("ltdd", "ltdd@no_dam", "ltdd+rectify@validation",
                              "ltdd+rectify@no_dam_validation", "ltdd@relabel")
  cell = benchmark.cell_config(config, 10.0, 1, "ltdd+rectify@no_dam_validation", tmp_path)
  assert (cell.method, cell.ltdd.dam, cell.rectify.mode) == ("ltdd+rectify", False, "validation")
  # `validation` changes only the evaluation: the plain row's set; `no_dam` changes the
  # distillation: the `@no_dam` row's set.
  source = lambda m: benchmark.distilling_cell(tmp_path, 10.0, 1, m, config).name
  assert source("ltdd+rectify@validation") == "if10_ipc1_ltdd"
  assert source("ltdd+rectify@no_dam_validation") == "if10_ipc1_ltdd@no_dam"
  assert benchmark.distilling_cell(tmp_path, 10.0, 1, "ltdd@no_dam", config) is None
  assert source("ltdd@relabel") == "if10_ipc1_ltdd"  # an evaluation-only variant of a base
  seen = {}
  def fake_run(cell_config, workdir, data=None):
    seen[workdir.name] = (cell_config.method, cell_config.ltdd.dam, cell_config.rectify.mode)
    if cell_config.evaluate.protocol == "relabel":
      seen[workdir.name] += ("relabel",)
    workdir.mkdir(parents=True, exist_ok=True)
    report = {"method": cell_config.method, "test_acc_mean": 50.0, "test_acc_std": 1.0,
              "wall_seconds": 1.0, "num_images": 10}
    (workdir / "report.json").write_text(json.dumps(report))
  monkeypatch.setattr(pipeline, "run_pipeline", fake_run)
  benchmark.run_grid(config, tmp_path)
  assert seen == {"if10_ipc1_ltdd": ("ltdd", True, "adsa"),
                  "if10_ipc1_ltdd@no_dam": ("ltdd", False, "adsa"),
                  "if10_ipc1_ltdd-rectify@validation": ("ltdd+rectify", True, "validation"),
                  "if10_ipc1_ltdd-rectify@no_dam_validation": ("ltdd+rectify", False,
                                                                "validation"),
                  "if10_ipc1_ltdd@relabel": ("ltdd", True, "adsa", "relabel")}
  assert "| ltdd+rectify@no_dam_validation |" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("dataset,factors", [("cifar10", (100.0, 10.0)), ("cifar100", (50.0, 10.0))])
@pytest.mark.parametrize("best", ["unilevel", "ltdd@no_dam"])
def test_final_grid_rows_take_sets_only_from_earlier_rows(tmp_path, dataset, factors, best):
  """`grid=final`: every row under both protocols (rectified and two-stage rows under `fixed`
  only), both plugins on `best`, every cell a valid config, and a row that reuses a set takes it
  from an earlier row of its cell, so the cells run in order with no cycle (`ltdd@no_dam`
  distils; `ltdd@no_dam_relabel` takes it)."""
  from configs import benchmark as benchmark_config  # pylint: disable=g-import-not-at-top
  config = benchmark_config.get_config(f"profile=evidence,grid=final,dataset={dataset},best={best}")
  assert tuple(config.benchmark.imbalance_factors) == factors and config.benchmark.include_full
  methods = list(config.benchmark.methods)
  name, _, variant = best.partition("@")
  assert {f"{name}+hierarchical", f"{name}+two_stage"} <= {m.split("@")[0] for m in methods}
  hierarchical = next(m for m in methods if "+hierarchical" in m)
  assert hierarchical.endswith("frequency_groups")  # the grouping `+hierarchical` chose
  cell = benchmark.cell_config(config, factors[0], 10, hierarchical, tmp_path)
  assert (cell.grouping.strategy, cell.grouping.num_groups, cell.ltdd.dam) == (
      "frequency", 0, variant != "no_dam")
  fixed = [m for m in methods if "relabel" not in m]
  flat = [m for m in fixed if not any(p in m for p in ("+rectify", "+hierarchical", "+two_stage"))]
  assert len(methods) == len(fixed) + len(flat) and "random@relabel" in methods
  place = {m: i for i, m in enumerate(methods)}
  # Every cell is valid, and trajectory, statistics and baseline rows share one factor's settings.
  benchmark.check_cells(config, tmp_path, benchmark.cells(config))
  names = [benchmark.cell_name(factors[0], 10, r) for r in methods]
  for m in methods:
    source = benchmark.distilling_cell(tmp_path, factors[0], 10, m, config)
    # Only grid rows are sources: on CIFAR-100 the default grouping is the frequency one, so
    # `+hierarchical@frequency_groups` distils as `+hierarchical` (not a row) would, and distils
    # itself.
    if source is not None:
      taken = methods[names.index(source.name)]
      assert place[taken] < place[m], (m, taken)
  assert benchmark.distilling_cell(tmp_path, factors[0], 10, hierarchical, config) is None
  assert benchmark.distilling_cell(tmp_path, factors[0], 10, "ltdd@no_dam", config) is None
  assert benchmark.distilling_cell(tmp_path, factors[0], 10, "ltdd@no_dam_relabel",
                                   config).name.endswith("ltdd@no_dam")
  with pytest.raises(ValueError, match="grid must be 'default' or 'final'"):
    benchmark_config.get_config("grid=last")
  with pytest.raises(ValueError, match="best='mtt@relabel'.*without a variant or with `@no_dam`"):
    benchmark_config.get_config("profile=evidence,grid=final,best=mtt@relabel")


def test_a_variant_that_moves_rectification_to_init_distils_itself(tmp_path):
  from configs import benchmark as benchmark_config  # pylint: disable=g-import-not-at-top
  config = benchmark_config.get_config("dataset=digits")
  with config.unlocked():
    config.benchmark.variants.init = {"rectify": {"at": "init"}}
  config.benchmark.methods = ("datm", "datm+rectify@init", "datm+two_stage+rectify@init")
  assert benchmark.distilling_cell(tmp_path, 10.0, 1, "datm+rectify@init", config) is None
  # Its two-stage row evaluates the set of a row with the same (init-rectified) distillation.
  source = benchmark.distilling_cell(tmp_path, 10.0, 1, "datm+two_stage+rectify@init", config)
  assert source is None or source.name != "if10_ipc1_datm"
  with pytest.raises(ValueError, match="needs the grid's config"):
    benchmark.distilling_cell(tmp_path, 10.0, 1, "datm+rectify@init")


@pytest.mark.parametrize("row, message", [
    ("mtt+rectfy", "Unknown method suffix 'rectfy'"),
    ("ltdd@no_such", "variant 'no_such'"),
    ("ltdd@typo", "sets a key the config does not have"),
    ("ltdd@owned", "which the grid sets per row"),
    ("ltdd@wider", "changes model.width against row 'full'"),  # the factor's shared experts
    ("unilevel@shorter", "changes unilevel.observer_epochs against row 'full'"),  # its teacher
])
def test_a_bad_row_fails_before_any_cell_runs(tmp_path, monkeypatch, row, message):
  from configs import benchmark as benchmark_config  # pylint: disable=g-import-not-at-top
  config = benchmark_config.get_config("dataset=digits")
  with config.unlocked():
    config.benchmark.variants.typo = {"ltdd": {"damm": False}}
    config.benchmark.variants.owned = {"experts": {"directory": "elsewhere"}}
    config.benchmark.variants.wider = {"model": {"width": 64}}
    config.benchmark.variants.shorter = {"unilevel": {"observer_epochs": 3}}
  config.benchmark.methods = ("random", "mtt", row)  # the bad row last
  monkeypatch.setattr(pipeline, "run_pipeline", lambda *a, **k: pytest.fail("a cell ran"))
  with pytest.raises(errors.InputError, match=message):
    benchmark.run_grid(config, tmp_path)
  assert not (tmp_path / "config.json").exists()  # a rejected grid leaves its workdir as it was


def test_per_class_figures_order_classes_by_count_and_shade_the_reports_bands():
  # Labels not in count order, and a `thresholds` split whose bands are not thirds.
  row = {"per_class_acc": [10.0, 90.0, 50.0, 70.0], "train_counts": [5, 500, 50, 200],
         "shot_classes": {"many": [1, 3], "medium": [2], "few": [0]}}
  order, bands = benchmark.class_order(row)
  np.testing.assert_array_equal(order, [1, 3, 2, 0])  # 500, 200, 50, 5 images
  assert {k: v.tolist() for k, v in bands.items()} == {"many": [0, 1], "medium": [2], "few": [3]}
  old = {"per_class_acc": [1.0] * 6}  # a report from before the fields: label order, thirds
  order, bands = benchmark.class_order(old)
  assert order.tolist() == list(range(6)) and bands["few"].tolist() == [4, 5]
