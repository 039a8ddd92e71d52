"""Cost of the two convolution implementations, side by side in one run.

  python bench/conv_impl.py [--width 64 --syn_steps 5 --images 50 --repeats 3 --batch 256]

One meta-gradient (gradient of the MTT loss w.r.t. synthetic images through an unrolled ConvNet-3
student, DSA off) with `model.conv_impl = xla` and `im2col`; prints compile and run seconds of each
and `ratio=<xla/im2col>` (how many times faster im2col is). Then the first-order costs on a batch of
`--batch` images: one training step (cross-entropy gradient w.r.t. the parameters) and one forward
pass, printing `train_ratio=` and `forward_ratio=` (xla/im2col; below 1: XLA's is faster). `auto`
uses the faster per backend: for training (`_FASTEST`) and for forward passes only
(`_FASTEST_INFERENCE`, `models.for_inference`).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from ltdd_jax import models
from ltdd_jax.core import ensemble, matching
from timing import best_of


def meta_grad_fn(impl, width, syn_steps, num_images):
  model = models.make_classifier(models.ModelSpec(width=width, conv_impl=impl), 10)
  student = matching.Student(ensemble.make_apply(model),
                             matching.InnerSpec(syn_steps=syn_steps, batch_syn=num_images))
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  target = jax.tree.map(lambda p: p + 0.01, params)
  labels = jnp.arange(num_images) % 10

  @jax.jit
  def fn(images):
    return jax.grad(lambda x: matching.trajectory_matching_loss(
        student, {"images": x, "targets": labels, "lr": jnp.float32(0.01)},
        {"start": params, "target": target},
        jax.random.key(1)))(images)
  return fn


def measure(impl, args):
  fn = meta_grad_fn(impl, args.width, args.syn_steps, args.images)
  images = jax.random.normal(jax.random.key(2), (args.images, 32, 32, 3))
  t = time.perf_counter()
  grad = fn(images).block_until_ready()
  compile_s = time.perf_counter() - t
  times = []
  for _ in range(args.repeats):
    t = time.perf_counter()
    fn(images).block_until_ready()
    times.append(time.perf_counter() - t)
  return compile_s, min(times), np.asarray(grad)


def first_order_fns(impl, width, batch):
  """(one SGD-gradient step, one forward pass) of a ConvNet-3 on `batch` images, jitted."""
  model = models.make_classifier(models.ModelSpec(width=width, conv_impl=impl), 10)
  apply_fn = ensemble.make_apply(model)
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  labels = jnp.arange(batch) % 10

  def loss(p, x):
    logp = jax.nn.log_softmax(apply_fn(p, x))
    return -jnp.take_along_axis(logp, labels[:, None], 1).mean()

  train = jax.jit(lambda x: jax.grad(loss)(params, x))
  forward = jax.jit(lambda x: apply_fn(params, x))
  return train, forward


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--syn_steps", type=int, default=5)
  parser.add_argument("--images", type=int, default=50)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batch", type=int, default=256)
  args = parser.parse_args()
  print(f"backend={jax.default_backend()} devices={jax.device_count()} width={args.width} "
        f"syn_steps={args.syn_steps} images={args.images}")
  results = {impl: measure(impl, args) for impl in ("im2col", "xla")}
  for impl, (compile_s, run_s, _) in results.items():
    print(f"{impl:7s} first call (compile+run) {compile_s:7.2f}s  run {run_s:7.3f}s")
  diff = np.abs(results["im2col"][2] - results["xla"][2]).max()
  scale = np.abs(results["xla"][2]).max()
  print(f"max |grad_im2col - grad_xla| = {diff:.3e} (max |grad| {scale:.3e})")
  print(f"ratio={results['xla'][1] / results['im2col'][1]:.2f}")
  x = jax.random.normal(jax.random.key(3), (args.batch, 32, 32, 3))
  first = {impl: [best_of(lambda fn=fn: jax.block_until_ready(fn(x)), args.repeats)
                  for fn in first_order_fns(impl, args.width, args.batch)]
           for impl in ("im2col", "xla")}
  for impl, (train_s, forward_s) in first.items():
    print(f"{impl:7s} batch {args.batch}: training step {train_s:7.3f}s  forward {forward_s:7.3f}s")
  print(f"train_ratio={first['xla'][0] / first['im2col'][0]:.2f} "
        f"forward_ratio={first['xla'][1] / first['im2col'][1]:.2f}")


if __name__ == "__main__":
  main()
