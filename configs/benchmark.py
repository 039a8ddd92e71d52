"""The benchmark grid: imbalance factor x IPC x method on CIFAR-10/100-LT (or digits), experts shared.

  python -m launch.benchmark --config=configs/benchmark.py:profile=cpu --workdir=runs/bench
  python -m launch.benchmark --config=configs/benchmark.py:profile=paper,dataset=cifar100 --workdir=W
  python -m launch.benchmark --config=configs/benchmark.py:dataset=digits --workdir=runs/bench_digits
  python -m launch.benchmark --config=configs/benchmark.py:profile=evidence,grid=final --workdir=W

Every cell is a full pipeline run in <workdir>/<cell>/; a finished cell (report.json present) is not
run again, so an interrupted grid resumes where it stopped. With `benchmark.records=DIR` (the
final grid's default: bench/records/final_<dataset>_<test>) each finished cell's report and config
are also kept in DIR, and a grid in a fresh workdir restores them instead of running those cells.
"""

import ml_collections

from configs import cifar10_lt, common, digits_lt

METHODS = ("random", "herding", "mtt", "datm", "ltdd", "random+two_stage", "herding+two_stage",
           "mtt+two_stage", "datm+two_stage", "ltdd+two_stage")
HIERARCHICAL = ("mtt+hierarchical", "ltdd+hierarchical")
# The soft-label sets rectified (ADSA-style): each cell evaluates its base cell's set again.
RECTIFIED = ("datm+rectify", "ltdd+rectify")
# Rows that take a named set of overrides (`method@variant`, `benchmark.variants`): LTDD-style
# without its class-frequency-weighted inner loss, and tau chosen on the validation split.
VARIANTS = ("ltdd@no_dam", "ltdd+rectify@no_dam", "datm+rectify@validation",
            "ltdd+rectify@validation", "ltdd+rectify@no_dam_validation")
# The evidence grid: the baselines, the three matching methods and both plugins on MTT and
# LTDD-style (with and without DAM). `+hierarchical` takes the frequency grouping: it wants groups
# close to balanced inside (its per-group experts learn what imbalance a group has), and chose it
# on the validation split at CIFAR-10-LT IF 100 and IF 10, where the profile's similarity groups
# serve the two-stage classifier (docs/design.md §6).
EVIDENCE = ("random", "herding", "mtt", "datm", "ltdd", "mtt+two_stage", "ltdd+two_stage",
            "mtt+hierarchical@frequency_groups", "ltdd+hierarchical@frequency_groups",
            "ltdd+two_stage@no_dam", "ltdd+hierarchical@no_dam_frequency_groups") + (
                RECTIFIED + VARIANTS)


def final_rows(best: str) -> tuple[str, ...]:
  """The final benchmark's rows (`grid=final`): the baselines, the three trajectory-matching
  methods (LTDD-style with and without DAM), the statistics-matching method, rectification on the
  soft-label sets and both plugins on `best` (`+hierarchical` with the frequency grouping it chose
  on the validation split, `+two_stage` with the profile's); then each row again under the
  teacher-relabel protocol, an evaluation-only row that takes its base row's set, but the
  rectified rows (whose stored labels a relabelled network never reads) and the two-stage ones
  (the protocol relabels a flat network's class targets)."""
  base = ("random", "herding", "mtt", "datm", "datm+rectify", "ltdd", "ltdd@no_dam", "unilevel",
          "unilevel+rectify")
  name, at, variant = best.partition("@")
  if variant not in ("", "no_dam"):
    raise ValueError(f"best={best!r}: the final grid's plugins run on a method row without a "
                     "variant or with `@no_dam` (e.g. best=unilevel, best=ltdd@no_dam).")
  frequency = f"{variant}_frequency_groups" if variant else "frequency_groups"
  plugins = (f"{name}+hierarchical@{frequency}", f"{name}+two_stage{at}{variant}")
  fixed = base + tuple(p for p in plugins if p not in base)
  flat = lambda m: not any(f"+{p}" in m for p in ("rectify", "hierarchical", "two_stage"))
  relabel = tuple(f"{m}_relabel" if "@" in m else f"{m}@relabel" for m in fixed if flat(m))
  return fixed + relabel


def get_config(arg=None):
  # `best` (grid=final): statistics matching, the published family's strongest and the best row
  # under `relabel` at CIFAR-10-LT IF 10 (holdout); the plugins on MTT and on LTDD-style without
  # DAM are measured in the evidence grid's cells (docs/design.md §6).
  args = common.parse_arg(arg, profile="cpu", dataset="cifar10", source="folder", test="real",
                          grid="default", best="unilevel")
  if args.dataset == "digits":
    c = digits_lt.get_config(f"profile={args.profile}")
    factors, ipcs = (10.0,), (1, 5, 10)
  elif args.dataset in ("cifar10", "cifar100"):
    c = cifar10_lt.cifar_config(f"profile={args.profile},source={args.source},test={args.test}",
                                args.dataset)
    factors, ipcs = (10.0, 100.0), (1, 10)
    if args.profile == "paper":
      factors, ipcs = (10.0, 50.0, 100.0, 200.0), (1, 10, 50)
    elif args.profile == "evidence":  # the cells the published ordering is judged on first
      factors, ipcs = (100.0, 10.0), (10, 1)
  else:
    raise ValueError(f"dataset must be digits, cifar10 or cifar100, got {args.dataset!r}.")
  c.unlock()
  c.benchmark = ml_collections.ConfigDict()
  c.benchmark.imbalance_factors = factors
  c.benchmark.ipcs = ipcs
  # The CIFAR `cpu` grid (40 cells; 1.64 h on a 2-core CPU, bench/RESULTS.md) leaves out the
  # hierarchical cells (each trains group and per-group experts) and the `full` row to stay under
  # 2 hours; add them with --config.benchmark.methods=... and --config.benchmark.include_full=True.
  cpu_cifar = args.profile == "cpu" and args.dataset != "digits"
  c.benchmark.methods = METHODS + RECTIFIED + (() if cpu_cifar else HIERARCHICAL)
  if args.profile == "evidence":
    c.benchmark.methods = EVIDENCE
  c.benchmark.include_full = not cpu_cifar  # one `full` row per imbalance factor
  # A folder (relative to where the grid runs, meant to be committed) that keeps each finished
  # cell's report.json and config.json: a grid run in a fresh workdir restores them and runs only
  # the other cells, so a grid longer than a working session survives a new checkout. "": none.
  c.benchmark.records = ""
  if args.grid == "final":
    # The final benchmark: CIFAR-10-LT IF 100 / 10, CIFAR-100-LT IF 50 / 10, IPC 10 / 1; `best`
    # (a row name) is the method both plugins are measured on.
    if args.dataset == "digits":
      raise ValueError("grid=final is the CIFAR benchmark; use dataset=cifar10 or cifar100.")
    factors, ipcs = (100.0, 10.0) if args.dataset == "cifar10" else (50.0, 10.0), (10, 1)
    c.benchmark.imbalance_factors, c.benchmark.ipcs = factors, ipcs
    c.benchmark.methods = final_rows(args.best)
    c.benchmark.include_full = True
    c.benchmark.records = f"bench/records/final_{args.dataset}_{args.test}"
  elif args.grid != "default":
    raise ValueError(f"grid must be 'default' or 'final', got {args.grid!r}.")
  # `method@name` rows: the cell's config with these overrides applied last. A row that only
  # changes the evaluation takes the set of the first row with its distillation settings: the
  # plain base row's for `validation` and `relabel`, the `@no_dam` row's for `no_dam_validation`.
  # A factor's cells share data and experts: variants may not change them.
  # Each `no_dam_<v>` is `no_dam` with `<v>` (their keys are disjoint).
  no_dam = {"ltdd": {"dam": False}}
  variants = {
      "validation": {"rectify": {"mode": "validation"}},
      # Evaluated with the statistics-matching teacher's labels on every augmented batch.
      "relabel": {"evaluate": {"protocol": "relabel"}},
      # The class-frequency grouping with its automatic group count, for a row whose method
      # wants other groups than the profile's (e.g. `+hierarchical` at a high imbalance factor).
      "frequency_groups": {"grouping": {"strategy": "frequency", "num_groups": 0}},
  }
  c.benchmark.variants = ml_collections.ConfigDict({
      "no_dam": no_dam, **variants,
      **{f"no_dam_{name}": {**no_dam, **overrides} for name, overrides in variants.items()}})
  # Settings each imbalance factor's and each IPC's cells take (the published per-factor LTDD
  # values; the paper profile's per-IPC values). A grid overridden to other factors or IPCs
  # needs entries for them.
  cifar = args.dataset != "digits"
  c.benchmark.factor_settings = {
      f"if{f:g}": cifar10_lt.factor_settings(f, args.dataset, args.profile) for f in factors}
  c.benchmark.ipc_settings = {
      f"ipc{i}": cifar10_lt.ipc_settings(args.profile, i, args.dataset) if cifar else {}
      for i in ipcs}
  c.lock()
  return c
