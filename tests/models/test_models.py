import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ltdd_jax import models
from ltdd_jax.models import layers


@pytest.mark.parametrize("arch", models.ARCHS)
@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (2, 8, 8, 1)])
def test_output_shapes(arch, shape):
  cfg = models.ModelSpec(width=8)
  net = models.make_classifier(cfg, 7, arch, width=4)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)  # shapes only: traced, never run
  params = jax.eval_shape(net.init, jax.random.key(0), x)
  chex.assert_shape(jax.eval_shape(net.apply, params, x), (2, 7))
  assert set(params["params"]) == {"backbone", "head"}


@pytest.mark.parametrize("arch", models.ARCHS)
def test_torch_init_matches_pytorch_defaults(arch):
  """model.init=torch: every kernel and bias uniform in +-1/sqrt(fan_in) (std 1/sqrt(3 fan_in)),
  PyTorch's Conv2d / Linear default; model.init=flax keeps Flax's larger kernels and zero biases."""
  cfg = models.ModelSpec()
  x = jnp.zeros((1, 8, 8, 3))  # kernel shapes do not depend on the image size
  init = lambda spec: jax.jit(models.make_classifier(spec, 10, arch, width=32).init)
  params = init(cfg)(jax.random.key(0), x)["params"]
  leaves = jax.tree_util.tree_leaves_with_path(params)
  kernels = [(p, v) for p, v in leaves if p[-1].key == "kernel"]
  assert kernels
  for path, kernel in kernels:
    fan_in = int(np.prod(kernel.shape[:-1]))
    bound = 1 / np.sqrt(fan_in)
    assert np.abs(kernel).max() <= bound, path
    if kernel.size >= 5_000:  # wide enough for a 5 % check of the std (7 sigma)
      np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3), rtol=0.05, err_msg=str(path))
  head = params["head"]
  fan_in = head["kernel"].shape[0]
  assert 0 < np.abs(head["bias"]).max() <= 1 / np.sqrt(fan_in)
  cfg = dataclasses.replace(cfg, init="flax")
  flax_params = init(cfg)(jax.random.key(0), x)["params"]
  conv = [v for p, v in jax.tree_util.tree_leaves_with_path(flax_params["backbone"])
          if p[-1].key == "kernel" and v.size >= 5_000][0]
  np.testing.assert_allclose(conv.std(), np.sqrt(2 / np.prod(conv.shape[:-1])), rtol=0.05)
  assert not np.any(flax_params["head"]["bias"])
  cfg = dataclasses.replace(cfg, init="xavier")
  with pytest.raises(ValueError, match="model.init 'xavier'"):
    jax.eval_shape(models.make_classifier(cfg, 10, arch, width=4).init, jax.random.key(0), x)


@pytest.mark.parametrize("stride,padding,k", [(1, 1, 3), (2, 1, 3), (1, 2, 5), (2, 0, 1)])
def test_conv_impls_agree_in_value_and_derivatives(stride, padding, k):
  with jax.enable_x64(True):  # float64, so only real differences (not rounding) show.
    _check_conv_impls(stride, padding, k)


def _check_conv_impls(stride, padding, k):
  x = jax.random.normal(jax.random.key(0), (2, 7, 7, 3), dtype=jnp.float64)
  w = jax.random.normal(jax.random.key(1), (k, k, 3, 4), dtype=jnp.float64)
  a = layers.im2col_conv(x, w, stride, padding)
  b = layers.xla_conv(x, w, stride, padding)
  np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)

  def loss(fn):
    # A "meta" objective: one inner gradient step on w, then a loss of the updated kernel; its
    # gradient w.r.t. x is a second derivative through the convolution.
    def inner(w_, x_):
      return jnp.sum(jnp.tanh(fn(x_, w_, stride, padding)) ** 2)
    return lambda x_: inner(w - 0.1 * jax.grad(inner)(w, x_), x_)

  first = lambda fn: jax.grad(lambda w_: jnp.sum(jnp.tanh(fn(x, w_, stride, padding)) ** 2))(w)
  np.testing.assert_allclose(first(layers.im2col_conv), first(layers.xla_conv), rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(jax.grad(loss(layers.im2col_conv))(x),
                             jax.grad(loss(layers.xla_conv))(x), rtol=1e-9, atol=1e-9)


def test_conv_impl_selection():
  assert layers.resolve_conv_impl("auto") == "im2col"  # tests run on CPU
  assert layers.resolve_conv_impl("xla") == "xla"
  with pytest.raises(ValueError, match="accepted"):
    layers.resolve_conv_impl("winograd")


@pytest.mark.parametrize("arch", ["convnet", "resnet18"])
def test_for_inference_same_function_faster_conv(arch):
  cfg = models.ModelSpec()
  net = models.make_classifier(cfg, 5, arch, width=4)
  fast = models.for_inference(net)
  assert fast.backbone.conv_impl == "xla"  # CPU: XLA's convolution for forward passes
  assert layers.resolve_conv_impl("auto", inference=True) == "xla"
  x = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
  params = jax.jit(net.init)(jax.random.key(1), x)
  np.testing.assert_allclose(jax.jit(fast.apply)(params, x), jax.jit(net.apply)(params, x),
                             rtol=1e-4, atol=1e-4)
  cfg = dataclasses.replace(cfg, conv_impl="im2col")  # an explicit choice is kept
  explicit = models.make_classifier(cfg, 5, arch, width=4)
  assert models.for_inference(explicit).backbone.conv_impl == "im2col"


def test_multi_head_concatenates_its_heads():
  spec = models.ModelSpec(width=4, depth=2)
  net = models.Classifier(models.make_backbone(spec), models.make_multi_head(spec, (2, 3, 1)))
  params = net.init(jax.random.key(0), jnp.zeros((5, 8, 8, 1)))["params"]
  chex.assert_shape(net.apply({"params": params}, jnp.zeros((5, 8, 8, 1))), (5, 6))
  assert sorted(params["head"]) == ["head_0", "head_1", "head_2"]
  assert models.num_outputs(net) == 6 and models.head_segments(net) == (2, 3, 1)
  assert models.head_segments(models.make_classifier(spec, 6)) == ()
