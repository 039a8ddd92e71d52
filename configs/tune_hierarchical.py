"""Choosing the hierarchical plugin's settings on the validation split (never the test split).

  python -m launch.tune --config=configs/tune_hierarchical.py:dataset=cifar10,method=mtt+hierarchical --workdir=W
  python -m launch.tune --config=configs/tune_hierarchical.py:dataset=digits --workdir=W \
      --config.tuning.search.grouping.lambda_1='(0.5, 1.0, 2.0)'

Every combination of `tuning.search` is one run evaluated on validation; `W/selection.md` lists
them, `W/selection.json` names the choice. Resumable: rerun the same command.
"""

import ml_collections

from configs import cifar10_lt, common, digits_lt


def get_config(arg=None):
  args = common.parse_arg(arg, dataset="digits", profile="cpu", source="folder",
                          method="mtt+hierarchical", imbalance_factor=100.0, ipc=10)
  if args.dataset == "digits":
    c = digits_lt.get_config(f"profile={args.profile}")
  elif args.dataset in ("cifar10", "cifar100"):
    c = cifar10_lt.cifar_config(
        f"profile={args.profile},source={args.source},imbalance_factor={args.imbalance_factor},"
        f"ipc={args.ipc}", args.dataset)
  else:
    raise ValueError(f"dataset must be digits, cifar10 or cifar100, got {args.dataset!r}.")
  c.unlock()
  c.method = args.method
  c.tuning = ml_collections.ConfigDict()
  # The searched values, by config section; every combination is tried (16 runs by default).
  c.tuning.search = ml_collections.ConfigDict({"grouping": {
      "lambda_1": (0.5, 1.0),
      "lambda_2": (0.5, 1.0),
      "strategy": ("frequency", "similarity"),
      "num_groups": (2, 3),
  }})
  c.lock()
  return c
