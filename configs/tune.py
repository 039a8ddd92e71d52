"""Choosing settings on the validation split (never the test split).

  python -m launch.tune --config=configs/tune.py:dataset=cifar10,profile=evidence,search=distill --workdir=W
  python -m launch.tune --config=configs/tune.py:dataset=cifar10,method=ltdd+hierarchical --workdir=W
  python -m launch.tune --config=configs/tune.py:dataset=digits --workdir=W \
      --config.tuning.search.grouping.lambda_1='(0.5, 1.0, 2.0)'

`search` names what is searched: `hierarchical` (the plugin's lambdas, grouping strategy and
number of groups), `grouping` (the grouping strategy, number of groups (0: as `max_imbalance`
cuts them) and two-stage architecture, method mtt+two_stage: one distillation serves every
candidate), `stage1` (how the group experts of mtt+hierarchical draw: every group or every class
equally often; the per-group experts serve every candidate), `distill` (MTT's start window and
image lr), `labels` (the soft labels' lr, method datm), `synthesis` (statistics matching's Adam
iterations and lr on the pixels, method unilevel: one set of observers serves every candidate)
or `statistics` (the weight of its batch-norm statistics term). Every combination of
`tuning.search` is one run evaluated on validation; `W/selection.md` lists them,
`W/selection.json` names the choice. Resumable: rerun the same command.
"""

import ml_collections

from configs import cifar10_lt, common, digits_lt

SEARCHES = {
    "hierarchical": {"grouping": {"lambda_1": (0.5, 1.0), "lambda_2": (0.5, 1.0),
                                  "strategy": ("frequency", "similarity"), "num_groups": (2, 3)}},
    "grouping": {"grouping": {"strategy": ("frequency", "similarity"), "num_groups": (0, 2, 3)},
                 "two_stage": {"arch": ("separate", "shared")}},
    # Stage 1's balance acts where stage-1 networks train on real images (the group experts of
    # +hierarchical), not on a distilled set: searched with the plugin, grouping fixed.
    "stage1": {"grouping": {"stage1_sampling": ("class_balanced", "by_class")}},
    "distill": {"distill": {"max_start_epoch": (10, 20), "lr_img": (100.0, 1000.0)}},
    "labels": {"datm": {"lr_label": (2.0, 10.0)}},
    "synthesis": {"unilevel": {"iterations": (1, 100, 1000), "lr": (0.005, 0.05)}},
    # The statistics term's weight at 100 Adam steps of lr 0.005 (`synthesis`'s 0.01 row).
    "statistics": {"unilevel": {"statistics_weight": (1.0, 100.0), "iterations": (100,),
                                "lr": (0.005,)}},
}
DEFAULT_METHOD = {"hierarchical": "mtt+hierarchical", "grouping": "mtt+two_stage",
                  "stage1": "mtt+hierarchical", "distill": "mtt",
                  "labels": "datm", "synthesis": "unilevel", "statistics": "unilevel"}


def get_config(arg=None):
  args = common.parse_arg(arg, dataset="digits", profile="cpu", source="folder", test="real",
                          method="", imbalance_factor=100.0, ipc=10, search="hierarchical")
  if args.search not in SEARCHES:
    raise ValueError(f"search must be one of {sorted(SEARCHES)}, got {args.search!r}.")
  if args.dataset == "digits":
    c = digits_lt.get_config(f"profile={args.profile}")
  elif args.dataset in ("cifar10", "cifar100"):
    c = cifar10_lt.cifar_config(
        f"profile={args.profile},source={args.source},test={args.test},"
        f"imbalance_factor={args.imbalance_factor},ipc={args.ipc}", args.dataset)
  else:
    raise ValueError(f"dataset must be digits, cifar10 or cifar100, got {args.dataset!r}.")
  c.unlock()
  c.method = args.method or DEFAULT_METHOD[args.search]
  c.tuning = ml_collections.ConfigDict()
  # The searched values, by config section; every combination is tried.
  c.tuning.search = ml_collections.ConfigDict(SEARCHES[args.search])
  c.lock()
  return c
