"""Second-derivative cost of the two convolution implementations, side by side in one run.

  python bench/conv_impl.py [--width 64 --syn_steps 5 --images 50 --repeats 3]

One meta-gradient (gradient of the MTT loss w.r.t. synthetic images through an unrolled ConvNet-3
student, DSA off) with `model.conv_impl = xla` and `im2col`. Prints compile and run seconds of each
and, last, `ratio=<xla/im2col>` (how many times faster im2col is). `auto` uses the faster per backend.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from ltdd_jax import matching, models, training


def meta_grad_fn(impl, width, syn_steps, num_images):
  cfg = common.base_config()
  cfg.model.width, cfg.model.conv_impl = width, impl
  cfg.dsa.enabled = False
  model = models.make_classifier(cfg.model, 10)
  apply_fn = training.make_apply(model)
  spec = matching.InnerSpec(syn_steps=syn_steps, batch_syn=num_images)
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  target = jax.tree.map(lambda p: p + 0.01, params)
  labels = jnp.arange(num_images) % 10

  @jax.jit
  def fn(images):
    return jax.grad(lambda x: matching.trajectory_matching_loss(
        apply_fn, spec, cfg.dsa, x, labels, jnp.float32(0.01), params, target,
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


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--syn_steps", type=int, default=5)
  parser.add_argument("--images", type=int, default=50)
  parser.add_argument("--repeats", type=int, default=3)
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


if __name__ == "__main__":
  main()
