"""Layers shared by every architecture: a convolution with a selectable implementation, norms, pools.

Why a custom convolution: on CPU, XLA's second derivative of `lax.conv_general_dilated` through an
unrolled student is pathologically slow (26x slower than im2col for one meta-gradient). The
`im2col` form (shifted slices concatenated along channels, then one matmul) computes the same function
with plain slicing and dot products, whose derivatives of any order XLA handles well. `auto` picks the
implementation measured fastest for the backend (bench/conv_impl.py).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ltdd_jax import errors, parallel

CONV_IMPLS = ("auto", "xla", "im2col")
NORMS = ("instance", "batch", "none")
INITS = ("torch", "flax")
# Measured per backend by bench/conv_impl.py (see bench/RESULTS.md). GPU/TPU convolutions are
# native and fast; on CPU im2col wins for anything differentiated twice, while XLA's own convolution
# is the faster forward pass (3.4x at width 32), so inference uses it.
_FASTEST = {"cpu": "im2col", "gpu": "xla", "tpu": "xla"}
_FASTEST_INFERENCE = {"cpu": "xla", "gpu": "xla", "tpu": "xla"}


def resolve_conv_impl(impl: str, inference: bool = False) -> str:
  """Maps `auto` to the measured-fastest implementation for the default backend: for training
  (differentiated, possibly twice), or for `inference` (forward pass only)."""
  fastest = _FASTEST_INFERENCE if inference else _FASTEST
  return parallel.resolve_for_backend("model.conv_impl", impl, CONV_IMPLS, fastest, "xla")


def im2col_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """2-D convolution (cross-correlation, NHWC / HWIO) as shifted slices plus one matmul.

  Args:
    x: [N, H, W, Cin].
    kernel: [kh, kw, Cin, Cout].
    stride: spatial stride.
    padding: zero padding on each side.

  Returns:
    [N, Ho, Wo, Cout], equal to `lax.conv_general_dilated` with the same arguments.
  """
  kh, kw, _, cout = kernel.shape
  if padding:
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  n, h, w, cin = x.shape
  ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
  patches = [x[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
             for i in range(kh) for j in range(kw)]
  cols = jnp.concatenate(patches, axis=-1)  # [N, Ho, Wo, kh*kw*Cin], (i, j, c) order = HWIO.
  return (cols.reshape(-1, kh * kw * cin) @ kernel.reshape(kh * kw * cin, cout)).reshape(
      n, ho, wo, cout)


def xla_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """The same convolution through `lax.conv_general_dilated`."""
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), [(padding, padding), (padding, padding)],
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def kernel_init(init: str, flax_default):
  """The weight initialiser of `init`: `torch` is PyTorch's default for Conv2d and Linear
  (kaiming-uniform with a = sqrt(5), i.e. uniform in +-1/sqrt(fan_in)), which every published
  distillation network uses; `flax` keeps Flax's default for the layer (`flax_default`).

  The two differ in scale (Flax's conv kernels are sqrt(6) = 2.4x and its Dense kernels sqrt(3) =
  1.7x larger), which behind a normalisation layer acts like a several times lower learning rate."""
  if init == "torch":
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
  if init == "flax":
    return flax_default
  raise errors.InputError(f"Unknown model.init {init!r}; accepted: {INITS}.")


def bias_init(init: str, fan_in: int):
  """The bias initialiser of `init`: PyTorch's uniform in +-1/sqrt(fan_in), or Flax's zeros."""
  if init == "flax":
    return nn.initializers.zeros
  if init != "torch":
    raise errors.InputError(f"Unknown model.init {init!r}; accepted: {INITS}.")
  bound = 1.0 / max(fan_in, 1) ** 0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class Conv(nn.Module):
  """k x k convolution with bias; `impl` is `xla`, `im2col` or `auto`; `init` is `torch` or `flax`."""
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: int = 1
  impl: str = "auto"
  use_bias: bool = True
  init: str = "torch"

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", kernel_init(self.init, nn.initializers.kaiming_uniform()),
                        (k, k, x.shape[-1], self.features))
    fn = im2col_conv if resolve_conv_impl(self.impl) == "im2col" else xla_conv
    y = fn(x, kernel.astype(x.dtype), self.stride, self.padding)
    if self.use_bias:
      y = y + self.param("bias", bias_init(self.init, k * k * x.shape[-1]), (self.features,))
    return y


class Dense(nn.Module):
  """Linear layer {kernel [F, out], bias [out]} with `torch` or `flax` initialisation (the tree of
  `nn.Dense`, whose bias initialiser cannot see the fan-in PyTorch's default needs)."""
  features: int
  init: str = "torch"

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", kernel_init(self.init, nn.initializers.lecun_normal()),
                        (x.shape[-1], self.features))
    bias = self.param("bias", bias_init(self.init, x.shape[-1]), (self.features,))
    return x @ kernel + bias


class Norm(nn.Module):
  """Instance norm, batch norm or identity, with affine.

  Batch norm normalises with the current batch's statistics, or with stored ones
  (`stored_stats`: the `batch_stats` collection's `mean` and `var` [C], e.g. recalibrated per class
  by `methods.statistics`). It records what its input looked like in the `moments` collection
  when that collection is mutable (a no-op otherwise): per image, the spatial mean and mean
  square of each channel ([N, C] each), from which any group of images' mean and variance follow.
  """
  kind: str = "instance"
  epsilon: float = 1e-5
  stored_stats: bool = False

  @nn.compact
  def __call__(self, x):
    if self.kind == "none":
      return x
    if self.kind == "instance":
      axes = (1, 2)
    elif self.kind == "batch":
      axes = (0, 1, 2)
      self.sow("moments", "input", (x.mean(axis=(1, 2)), jnp.square(x).mean(axis=(1, 2))))
    else:
      raise errors.InputError(f"Unknown norm {self.kind!r}; accepted: {NORMS}.")
    if self.kind == "batch" and self.stored_stats:
      channels = x.shape[-1]
      mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,)).value
      var = self.variable("batch_stats", "var", jnp.ones, (channels,)).value
    else:
      mean = x.mean(axis=axes, keepdims=True)
      var = jnp.square(x - mean).mean(axis=axes, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
    return y * scale + bias


def pool2x2(x: jax.Array, kind: str = "avg") -> jax.Array:
  """2x2 stride-2 pooling as a reshape (cheap to differentiate twice). x: [N, H, W, C]."""
  n, h, w, c = x.shape
  if h < 2 or w < 2:
    return x
  x = x[:, :h // 2 * 2, :w // 2 * 2, :].reshape(n, h // 2, 2, w // 2, 2, c)
  return x.mean(axis=(2, 4)) if kind == "avg" else x.max(axis=(2, 4))
