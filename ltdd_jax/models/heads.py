"""Classifier heads: flat, group-level and one-per-group (DESIGN §2, §6)."""

from __future__ import annotations

import flax.linen as nn


class GroupHead(nn.Module):
  """Linear head over G groups: features [N, F] -> logits [N, G]."""
  num_groups: int

  @nn.compact
  def __call__(self, features):
    return nn.Dense(self.num_groups)(features)


class WithinGroupHeads(nn.Module):
  """One linear head per group: features [N, F] -> tuple of logits [N, size_g]."""
  group_sizes: tuple[int, ...]

  @nn.compact
  def __call__(self, features):
    return tuple(nn.Dense(size, name=f"group_{g}")(features)
                 for g, size in enumerate(self.group_sizes))
