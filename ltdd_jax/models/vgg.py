"""VGG-11 sized for 32x32 inputs (pools are skipped once the map is 1x1, so 8x8 digits work)."""

from __future__ import annotations

import flax.linen as nn

from ltdd_jax.models import layers

# Channel multipliers of the base width; "M" is a 2x2 max-pool.
_VGG11 = (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M")


class VGG11(nn.Module):
  """VGG-11 with base width `width` (64 in the paper); returns flat features."""
  width: int = 64
  norm: str = "instance"
  conv_impl: str = "auto"
  init: str = "torch"

  @nn.compact
  def __call__(self, x):
    for item in _VGG11:
      if item == "M":
        x = layers.pool2x2(x, "max")
      else:
        x = layers.Conv(self.width * item, impl=self.conv_impl, init=self.init)(x)
        x = nn.relu(layers.Norm(self.norm)(x))
    return x.reshape(x.shape[0], -1)
