"""ResNet-18 sized for 32x32 inputs (CIFAR stem: one 3x3 conv, no max-pool)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ltdd_jax.models import layers


class BasicBlock(nn.Module):
  """Two 3x3 convs with a (projected when needed) residual connection."""
  features: int
  stride: int
  norm: str
  conv_impl: str
  init: str = "torch"

  @nn.compact
  def __call__(self, x):
    conv = lambda **kw: layers.Conv(self.features, impl=self.conv_impl, use_bias=False,
                                    init=self.init, **kw)
    y = conv(stride=self.stride)(x)
    y = nn.relu(layers.Norm(self.norm)(y))
    y = conv()(y)
    y = layers.Norm(self.norm)(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = conv(kernel_size=1, stride=self.stride, padding=0)(x)
      x = layers.Norm(self.norm)(x)
    return nn.relu(x + y)


class ResNet18(nn.Module):
  """ResNet-18 with base width `width` (64 in the paper); returns pooled features [N, 8 * width]."""
  width: int = 64
  norm: str = "instance"
  conv_impl: str = "auto"
  init: str = "torch"

  @nn.compact
  def __call__(self, x):
    x = layers.Conv(self.width, impl=self.conv_impl, use_bias=False, init=self.init)(x)
    x = nn.relu(layers.Norm(self.norm)(x))
    for stage, mult in enumerate((1, 2, 4, 8)):
      for block in range(2):
        stride = 2 if stage > 0 and block == 0 and x.shape[1] > 1 else 1
        x = BasicBlock(self.width * mult, stride, self.norm, self.conv_impl, self.init)(x)
    return jnp.mean(x, axis=(1, 2))
