"""ConvNet-D/W: the standard dataset-distillation backbone (DESIGN §2)."""

from __future__ import annotations

import flax.linen as nn

from ltdd_jax.models import layers


class ConvNet(nn.Module):
  """D blocks of [3x3 conv, norm, ReLU, 2x2 avg-pool]; returns flat features [N, F].

  `stored_stats`: batch norm normalises with the `batch_stats` collection (`layers.Norm`)."""
  depth: int = 3
  width: int = 128
  norm: str = "instance"
  conv_impl: str = "auto"
  init: str = "torch"
  stored_stats: bool = False

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = layers.Conv(self.width, impl=self.conv_impl, init=self.init)(x)
      x = layers.Norm(self.norm, stored_stats=self.stored_stats)(x)
      x = nn.relu(x)
      x = layers.pool2x2(x, "avg")
    return x.reshape(x.shape[0], -1)
