"""AlexNet as used in dataset-distillation benchmarks (DC-bench), sized for 32x32 inputs."""

from __future__ import annotations

import flax.linen as nn

from ltdd_jax.models import layers


class AlexNet(nn.Module):
  """Five convs (5x5, 5x5, 3x3, 3x3, 3x3) with max-pools; `width` 64 gives 128-192-256-192-192."""
  width: int = 64
  conv_impl: str = "auto"
  init: str = "torch"

  @nn.compact
  def __call__(self, x):
    w = self.width
    plan = ((2 * w, 5, 2, True), (3 * w, 5, 2, True), (4 * w, 3, 1, False), (3 * w, 3, 1, False),
            (3 * w, 3, 1, True))
    for features, kernel, padding, pool in plan:
      x = nn.relu(layers.Conv(features, kernel_size=kernel, padding=padding,
                              impl=self.conv_impl, init=self.init)(x))
      if pool:
        x = layers.pool2x2(x, "max")
    return x.reshape(x.shape[0], -1)
