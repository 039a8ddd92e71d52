"""Published ConvNet-3 test accuracies (%) for the benchmark's cells, to print beside ours.

The figures and their sources are in docs/published.md (a test keeps the two equal): the
uni-level paper's Tables 1, 2 (whose random, MTT, DATM and LTDD rows it takes from the LTDD paper)
and 6 (IPC 1, which does not say which baseline rows it re-ran). They are the published protocol's
(docs/published.md says how it differs from our profiles), not our profile's; a method a paper
does not report at a cell has no entry.
"""

# dataset -> (imbalance factor, IPC) -> method (our registry's name) -> "mean +- std".
PUBLISHED = {
    "cifar10": {
        (10.0, 10): {"random": "32.5 +- 2.2", "mtt": "58.0 +- 0.8", "datm": "57.2 +- 0.4",
                     "ltdd": "58.1 +- 0.3", "unilevel": "63.6 +- 0.5"},
        (50.0, 10): {"random": "33.2 +- 0.4", "mtt": "45.8 +- 1.4", "datm": "41.6 +- 0.2",
                     "ltdd": "54.2 +- 1.0", "unilevel": "62.9 +- 0.2"},
        (100.0, 10): {"random": "34.4 +- 2.0", "mtt": "37.7 +- 0.6", "datm": "37.3 +- 0.2",
                      "ltdd": "53.4 +- 0.1", "unilevel": "62.7 +- 0.1"},
        (100.0, 1): {"datm": "20.4 +- 0.5", "ltdd": "24.1 +- 0.5", "unilevel": "44.8 +- 0.3"},
        (100.0, 50): {"random": "52.6 +- 0.5", "mtt": "47.8 +- 1.1", "datm": "44.3 +- 0.1",
                      "ltdd": "64.0 +- 0.9", "unilevel": "68.8 +- 0.4"},
    },
    "cifar100": {
        (10.0, 10): {"random": "14.2 +- 0.6", "mtt": "14.3 +- 0.1", "datm": "28.2 +- 0.4",
                     "ltdd": "31.5 +- 0.2", "unilevel": "47.1 +- 0.1"},
        (20.0, 10): {"random": "15.0 +- 0.3", "mtt": "12.6 +- 0.3", "datm": "25.3 +- 0.3",
                     "ltdd": "31.4 +- 0.5", "unilevel": "45.5 +- 0.4"},
        (50.0, 10): {"random": "13.4 +- 0.5", "mtt": "8.2 +- 0.5", "datm": "22.2 +- 0.4",
                     "ltdd": "29.8 +- 0.3", "unilevel": "42.1 +- 0.1"},
        (50.0, 1): {"datm": "12.8 +- 0.4", "ltdd": "7.8 +- 0.3", "unilevel": "31.8 +- 0.1"},
        (10.0, 50): {"random": "32.1 +- 0.6", "mtt": "13.8 +- 0.2", "datm": "31.6 +- 0.1",
                     "ltdd": "40.0 +- 0.1", "unilevel": "49.9 +- 0.3"},
    },
}


def dataset_key(dataset: str | None) -> str | None:
  """The table's key for a report's dataset name (`cifar10_lt` -> `cifar10`); None if unknown."""
  if dataset is None:
    return None
  name = dataset.removesuffix("_lt")
  return name if name in PUBLISHED else None


def accuracy(dataset: str | None, factor: float, ipc: int | None, method: str) -> str | None:
  """The published figure for one of our rows, or None. Only a plain row under the default
  protocol matches (`ltdd`, not `ltdd@no_dam`, `ltdd@relabel` or `ltdd+rectify`): the papers'
  numbers are each method's own recipe."""
  key = dataset_key(dataset)
  if key is None or ipc is None:
    return None
  return PUBLISHED[key].get((float(factor), int(ipc)), {}).get(method)
