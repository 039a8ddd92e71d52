"""The layout's rules, read from the source: the stages alone read the config, the method string is
parsed in one place, and no layer imports one above it."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "ltdd_jax"
# Lowest first: a module may import its own layer and the layers before it.
LAYERS = ("base", "models", "data", "core", "evaluation", "methods", "run")
BASE = ("errors", "parallel", "seeds", "checkpoints", "reporting")


def _modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    yield path, ast.parse(path.read_text(), str(path))


def _layer(parts: tuple[str, ...]) -> str:
  """The layer of a module named by its parts below `ltdd_jax` (e.g. ('core', 'training'))."""
  if not parts or parts[0] in BASE or parts[0] == "__init__":
    return "base"
  return parts[0]


def _is_config_parameter(arg: ast.arg) -> bool:
  annotation = ast.unparse(arg.annotation) if arg.annotation else ""
  return (arg.arg in ("config", "cfg") or arg.arg.endswith("_config")
          or "ConfigDict" in annotation)


def test_only_the_stage_layer_takes_the_config():
  offenders = []
  for path, tree in _modules():
    if path.relative_to(PACKAGE).parts[0] == "run":
      continue
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
        offenders += [f"{path.relative_to(PACKAGE)}:{getattr(node, 'name', 'lambda')}({a.arg})"
                      for a in args if _is_config_parameter(a)]
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
        offenders += [f"{path.relative_to(PACKAGE)} imports ml_collections"
                      for n in names if n.startswith("ml_collections")]
  assert not offenders, offenders


def test_the_method_string_is_parsed_in_one_place():
  splits = []
  for path, tree in _modules():
    for node in ast.walk(tree):
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr in ("split", "partition", "rsplit") and node.args
          and isinstance(node.args[0], ast.Constant) and node.args[0].value == "+"):
        splits.append(str(path.relative_to(PACKAGE)))
  assert splits == ["methods/registry.py"]


@pytest.mark.parametrize("layer", LAYERS)
def test_no_layer_imports_one_above_it(layer):
  above = set(LAYERS[LAYERS.index(layer) + 1:])
  offenders = []
  for path, tree in _modules():
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if _layer(parts) != layer:
      continue
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ltdd_jax"):
        targets = [tuple((node.module + "." + a.name).split(".")[1:]) for a in node.names]
      elif isinstance(node, ast.Import):
        targets = [tuple(a.name.split(".")[1:]) for a in node.names if a.name.startswith("ltdd_jax")]
      else:
        continue
      offenders += [f"{'/'.join(parts)} -> {'.'.join(t)}" for t in targets if _layer(t) in above]
  assert not offenders, offenders
