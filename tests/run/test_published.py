"""The published figures the benchmark prints equal docs/published.md's tables."""

import pathlib
import re

from ltdd_jax.run import published

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "published.md"
METHODS = {"random": "random", "MTT": "mtt", "DATM": "datm", "LTDD": "ltdd",
           "uni-level": "unilevel"}


def doc_tables() -> dict:
  """dataset -> (IF, IPC) -> method -> figure, read from the doc's two tables ("-" left out)."""
  tables, dataset, columns = {}, None, None
  for line in DOC.read_text().splitlines():
    heading = re.fullmatch(r"## CIFAR-(10|100)-LT", line)
    if heading:
      dataset, columns = f"cifar{heading.group(1)}", None
      tables[dataset] = {}
    elif dataset and line.startswith("| method |"):
      columns = [tuple(map(float, re.fullmatch(r"IF (\d+) IPC (\d+)", c.strip()).groups()))
                 for c in line.strip("|").split("|")[1:]]
    elif dataset and columns and line.startswith("| ") and not line.startswith("|---"):
      name, *values = [c.strip() for c in line.strip("|").split("|")]
      for (factor, ipc), value in zip(columns, values):
        if value != "-":
          tables[dataset].setdefault((factor, int(ipc)), {})[METHODS[name]] = value
    elif not line.startswith("|"):
      columns = None
  return tables


def test_the_module_and_the_doc_agree():
  tables = doc_tables()
  assert set(tables) == {"cifar10", "cifar100"} and len(tables["cifar10"]) == 5
  assert tables == published.PUBLISHED


def test_only_plain_rows_of_known_cells_match():
  assert published.accuracy("cifar10_lt", 100, 10, "mtt") == "37.7 +- 0.6"
  assert published.accuracy("cifar100_lt", 50.0, 1, "unilevel") == "31.8 +- 0.1"
  for args in [("cifar10_lt", 100, 10, "mtt@relabel"), ("cifar10_lt", 100, 1, "mtt"),
               ("cifar10_lt", 100, None, "full"), ("digits_lt", 10, 10, "mtt"),
               (None, 100, 10, "mtt")]:
    assert published.accuracy(*args) is None, args
