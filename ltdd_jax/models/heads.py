"""Classifier heads: flat, group-level and one-per-group (DESIGN §2, §6)."""

from __future__ import annotations

import flax.linen as nn


class GroupHead(nn.Module):
  """Linear head over G outputs (groups, or a group's classes): features [N, F] -> logits [N, G].

  Its parameters are {kernel, bias}, the same tree as a flat `nn.Dense` head, so group networks and
  group experts unroll and match exactly like flat ones.
  """
  num_groups: int

  @nn.compact
  def __call__(self, features):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (features.shape[-1], self.num_groups))
    bias = self.param("bias", nn.initializers.zeros, (self.num_groups,))
    return features @ kernel + bias


class WithinGroupHeads(nn.Module):
  """One linear head per group: features [N, F] -> tuple of logits [N, size_g]."""
  group_sizes: tuple[int, ...]

  @nn.compact
  def __call__(self, features):
    return tuple(nn.Dense(size, name=f"group_{g}")(features)
                 for g, size in enumerate(self.group_sizes))
