import pytest

from ltdd_jax import errors
from ltdd_jax.methods import registry


def test_hierarchical_takes_every_base_that_synthesises():
  for base in ("mtt", "datm", "ltdd", "unilevel"):
    method = registry.parse(f"{base}+hierarchical")
    assert method.hierarchical and method.two_stage
    assert "grouping" in method.distills_with
    assert method.distillation == f"{base}+hierarchical"
  assert "grouping" not in registry.parse("unilevel+two_stage").distills_with
  for base in registry.BASELINES:
    with pytest.raises(errors.InputError, match="changes how the set is made"):
      registry.parse(f"{base}+hierarchical")
