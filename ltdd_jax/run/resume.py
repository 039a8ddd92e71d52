"""Workdirs that never mix runs: each stage's outputs record the config values they depend on.

A stage that writes into a folder (an expert set, the distillation checkpoints) first writes
`run_spec.json` there: the flattened config values its outputs depend on. Resuming compares the
current config with every record in the workdir before any work starts, and a difference fails
with the differing keys named, unless the user asked (`discard_mismatched`) to start those stages
afresh. Values that do not change a stage's result (how often to log or checkpoint, the
convolution implementation, the iteration count a run may be extended to) are not recorded.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

from ltdd_jax import errors, reporting
from ltdd_jax.methods import registry
from ltdd_jax.run import locks, specs

RECORD = "run_spec.json"
STAGES = ("experts", "observers", "distill")
MIN_FREE_BYTES = 64 * 2**20
# Keys whose value does not change what a stage computes: bookkeeping, the iteration count a run
# may be extended to, evaluation-only settings, and the implementation choices that compute the
# same function (convolution, ensemble, rematerialisation: they change float rounding only).
_NEUTRAL = ("data.cache_dir", "data.dataset", "model.conv_impl", "model.ensemble_impl",
            "experts.directory", "distill.iterations", "distill.checkpoint_every",
            "distill.log_every", "distill.eval_every", "distill.remat", "distill.remat_policy",
            "grouping.prediction")
# Keys added after records were first written, with the value every earlier record stands for:
# a record without one was made with that value.
_ADDED = {"data.validation_from": "pool"}
# metrics.jsonl records a discarded distillation leaves behind.
_DISTILL_RECORDS = ("distill", "distill_validation", "distill_done", "label_init", "objectives",
                    "rectify_init", "rectify", "rectify_validation")


def prepare_workdir(workdir) -> pathlib.Path:
  """Creates the workdir and proves it is a writable folder with room; raises `WorkdirError`."""
  workdir = pathlib.Path(os.path.expanduser(os.fspath(workdir)))
  if workdir.exists() and not workdir.is_dir():
    raise errors.WorkdirError(f"--workdir={workdir} is a file, not a folder; pass a folder path.")
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_probe") as f:
      f.write(b"ok")
      f.flush()
  except OSError as e:
    raise errors.WorkdirError(f"--workdir={workdir} cannot be written ({e.strerror or e}); pick a "
                              "folder you can write to, or fix its permissions.") from e
  free = shutil.disk_usage(workdir).free
  if free < MIN_FREE_BYTES:
    raise errors.WorkdirError(f"--workdir={workdir} has only {free / 2**20:.1f} MiB free; runs write "
                              "checkpoints there: free some space or use another disk.")
  return workdir


def flatten(config) -> dict:
  """{'section.key': value} of a ConfigDict, tuples as lists (what JSON gives back)."""
  out = {}

  def walk(node, prefix):
    for key, value in node.items():
      name = f"{prefix}{key}"
      if hasattr(value, "items"):
        walk(value, name + ".")
      else:
        out[name] = reporting.to_jsonable(value)

  walk(config, "")
  return out


def stage_values(config, stage: str, classifier: bool = False) -> dict:
  """The config values the outputs of `stage` depend on.

  experts: seed, data, dsa, model and experts (the classifier-only keys only for `classifier`
  sets); observers (statistics matching): seed, data, dsa, model and the `unilevel.observer_*`
  keys; distill: the experts' values (the observers' for statistics matching) plus the method,
  distill, datm, ltdd, (hierarchical) grouping and unilevel keys.
  """
  if stage not in STAGES:
    raise errors.InputError(f"Unknown stage {stage!r}; accepted: {STAGES}.")
  method = specs.method(config)
  if stage == "observers":
    return _selected(config, ("data.", "dsa.", "model.", "unilevel.observer_"))
  flat = flatten(config)
  statistics = method.base.kind == registry.STATISTICS
  sections = ["data.", "dsa.", "model."] + ([] if statistics else ["experts."])
  if stage == "distill":  # Only the option groups the method reads.
    sections += [f"{s}." for s in method.distills_with]
  keep = {k: v for k, v in flat.items() if k.startswith(tuple(sections)) and k not in _NEUTRAL}
  uses_classifiers = classifier or (stage == "distill" and method.options.ed)
  if not uses_classifiers:
    keep = {k: v for k, v in keep.items() if not k.startswith("experts.classifier_")}
    keep.pop("grouping.ed_min_imbalance", None)  # Which objectives use ED: moot without it.
  keep["seed"] = config.seed
  if stage == "distill":  # +two_stage only changes evaluation; +hierarchical changes the objective.
    keep["method"] = method.distillation
  return keep


def _selected(config, prefixes: tuple[str, ...]) -> dict:
  """The seed and every non-neutral config value under `prefixes`."""
  keep = {k: v for k, v in flatten(config).items() if k.startswith(prefixes) and k not in _NEUTRAL}
  return {**keep, "seed": config.seed}


def with_added(recorded: dict, current: dict) -> dict:
  """`recorded` with the value every earlier record stands for of each key added since (`_ADDED`)
  that `current` has and the record lacks."""
  return {**{k: v for k, v in _ADDED.items() if k in current}, **recorded}


def shared_values(config) -> dict:
  """The values every cell of one benchmark factor shares, whichever method its row runs: seed,
  data, augmentation, model, the trajectory experts' and the observers' settings (the cells
  share one dataset, one expert folder and one teacher)."""
  return _selected(config, ("data.", "dsa.", "model.", "experts.", "unilevel.observer_"))


def differences(recorded: dict, current: dict) -> list[str]:
  """`key: recorded -> now` lines for every key whose value differs (or exists on one side)."""
  keys = sorted(set(recorded) | set(current))
  missing = object()
  return [f"{k}: {recorded.get(k, '(absent)')!r} -> {current.get(k, '(absent)')!r}"
          for k in keys if recorded.get(k, missing) != current.get(k, missing)]


def _discarded(config) -> set[str]:
  stages = {s.strip() for s in config.discard_mismatched.split(",") if s.strip()}
  stages = set(STAGES) if "all" in stages else stages
  unknown = stages - set(STAGES)
  if unknown:
    raise errors.InputError(f"discard_mismatched={config.discard_mismatched!r}: unknown stage(s) "
                            f"{sorted(unknown)}; accepted: {', '.join(STAGES)}, all.")
  return stages


def _discard(directory: pathlib.Path, stage: str) -> None:
  """Removes a stage's outputs: its folder; for distillation also the synthetic set and the
  run's distillation records in metrics.jsonl (the new run writes its own)."""
  outputs = [directory]
  if stage == "distill":
    outputs += [directory.parent / "synthetic.npz", directory.parent / "synthetic.png"]
    reporting.MetricsWriter(directory.parent).drop_after(_DISTILL_RECORDS, -1)
  for out in outputs:
    if out.is_dir():  # Everything but the lock file, which this process may hold.
      for child in out.iterdir():
        if child.is_dir():
          shutil.rmtree(child)
        elif child.name != locks.LOCK_FILE:
          child.unlink()
    elif out.exists():
      out.unlink()


def claim(config, directory, stage: str, classifier: bool = False) -> None:
  """Before a stage writes into `directory`: checks the record there against the config (see
  `check`), or writes one. A folder that holds outputs but no record was not made by this
  version: it is an error, never adopted."""
  directory = pathlib.Path(directory)
  if check(config, directory, stage, classifier):
    return
  if directory.is_dir() and any(p.name not in (RECORD, locks.LOCK_FILE)
                                for p in directory.iterdir()):
    raise errors.ResumeMismatchError(
        f"{directory} holds {stage} outputs without a record of the config values they were made "
        "with; delete that folder to make them again, or use another --workdir (or "
        "experts.directory).")
  reporting.write_json(directory / RECORD,
                       {"stage": stage, "values": stage_values(config, stage, classifier)})


def check(config, directory, stage: str, classifier: bool = False) -> bool:
  """Compares `directory`'s record with the config; True when a matching record is there.

  A mismatch raises `ResumeMismatchError` naming the differing keys, or, when the stage is in
  `config.discard_mismatched`, removes the stage's outputs so that it starts afresh."""
  directory = pathlib.Path(directory)
  path = directory / RECORD
  if not path.exists():
    return False
  try:
    recorded = json.loads(path.read_text())["values"]
  except (ValueError, KeyError) as e:
    raise errors.InputError(f"{path} is unreadable ({e}); delete it (and the stage outputs beside "
                            "it if they are not from this config).") from e
  current = stage_values(config, stage, classifier)
  diff = differences(with_added(recorded, current), current)
  if not diff:
    return True
  if stage in _discarded(config):
    _discard(directory, stage)
    return False
  raise errors.ResumeMismatchError(
      f"{directory} holds {stage} outputs made with other config values:\n  " +
      "\n  ".join(diff) + f"\nUse another --workdir (or experts.directory), set those values back, "
      f"or start this stage afresh with --config.discard_mismatched={stage}.")


def check_workdir(config, workdir, expert_root, stages=STAGES) -> None:
  """Checks, before any work, the records of the outputs this command would resume from, among
  `stages`: the flat expert set (and its classifier experts under LTDD's ED), the group expert
  sets of a hierarchical run, and the distillation checkpoints in `workdir`. Stages the command
  does not read or write are not checked (each stage checks its own folder again when it opens
  it), so no message proposes to discard what the command would not redo."""
  _discarded(config)  # An unknown stage name fails even when nothing mismatches.
  method = specs.method(config)
  if not method.base.needs_experts:
    if "distill" in stages and method.synthesizes:  # statistics matching: its synthesis
      check(config, pathlib.Path(workdir) / "distill_ckpt", "distill")
    return
  expert_root = pathlib.Path(expert_root)
  ed = method.options.ed
  folders = [(expert_root / "flat", False)] + ([(expert_root / "flat_classifier", True)] if ed
                                              else [])
  if method.hierarchical and expert_root.is_dir():
    for record in sorted(expert_root.glob(f"grouping_*/*/{RECORD}")):
      classifier = record.parent.name.endswith("_classifier")
      if ed or not classifier:
        folders.append((record.parent, classifier))
  if "experts" in stages:
    for directory, classifier in folders:
      check(config, directory, "experts", classifier)
  if "distill" in stages and method.distils:
    check(config, pathlib.Path(workdir) / "distill_ckpt", "distill")


def copy_distillation(source: pathlib.Path | None, workdir: pathlib.Path) -> bool:
  """Copies the finished distillation of the run in `source` (its `distill_ckpt/`) into
  `workdir`, unless `workdir` has one of its own: a run whose distillation settings are the same
  (`stage_values(config, "distill")`) then resumes at the last iteration instead of distilling
  again. Returns whether it copied."""
  if source is None or not (pathlib.Path(source) / "synthetic.npz").exists():
    return False
  target = pathlib.Path(workdir) / "distill_ckpt"
  if target.exists():
    return False
  partial = target.with_name(f".{target.name}.copying")  # renamed once whole
  shutil.rmtree(partial, ignore_errors=True)
  shutil.copytree(pathlib.Path(source) / "distill_ckpt", partial)
  partial.rename(target)
  return True
