"""K experts trained as one program (vmap, or lax.map) vs the same K trained one after another.

  python bench/experts.py [--experts 8 --epochs 2 --images 2048 --width 32]

Same data (random CIFAR-shaped images), same epochs and per-expert keys; compile time is excluded
(every program is warmed up first). Then the ensemble's test-time logits (`training.predict`) with
vmap vs lax.map. The last lines are `speedup=<sequential/vmap>`, `speedup_map=<sequential/map>` and
`predict_map_speedup=<vmap/map>`: what `model.ensemble_impl=auto` picks per backend rests on them.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import cifar10_lt
from ltdd_jax import experts, models, training


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--experts", type=int, default=8)
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--images", type=int, default=2048)
  parser.add_argument("--width", type=int, default=32)
  args = parser.parse_args()
  config = cifar10_lt.get_config("profile=cpu")
  config.model.width = args.width
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(args.images, 32, 32, 3)).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, 10, args.images).astype(np.int32))
  model = models.make_classifier(config.model, 10)
  spec = experts.expert_spec(config.experts, np.asarray(labels), 10)
  fns = {impl: experts.make_epoch_fn(training.make_apply(model), spec, config.dsa, 10, impl)
         for impl in ("vmap", "map")}
  fn = fns["vmap"]
  params = training.init_ensemble(model, jax.random.key(0), args.experts, (32, 32, 3))
  velocity = jax.tree.map(jnp.zeros_like, params)
  lr = jnp.float32(config.experts.lr)
  keys = lambda e: jax.random.split(jax.random.key(e), args.experts)

  def together(impl):
    p, v = params, velocity
    for e in range(args.epochs):
      p, v, loss = fns[impl](p, v, keys(e), lr, images, labels, labels)
    return jax.block_until_ready(p)

  def sequential():
    out = []
    for k in range(args.experts):
      p = jax.tree.map(lambda x: x[k:k + 1], params)
      v = jax.tree.map(lambda x: x[k:k + 1], velocity)
      for e in range(args.epochs):
        p, v, loss = fn(p, v, keys(e)[k:k + 1], lr, images, labels, labels)
      out.append(p)
    return jax.block_until_ready(out)

  # Warm-up: compile both shapes (K and 1) on one epoch.
  for f in fns.values():
    jax.block_until_ready(f(params, velocity, keys(0), lr, images, labels, labels))
  one = lambda x: x[:1]
  jax.block_until_ready(fn(jax.tree.map(one, params), jax.tree.map(one, velocity), keys(0)[:1],
                           lr, images, labels, labels))
  t = time.perf_counter()
  batched = together("vmap")
  t_vmapped = time.perf_counter() - t
  t = time.perf_counter()
  mapped = together("map")
  t_mapped = time.perf_counter() - t
  t = time.perf_counter()
  looped = sequential()
  t_sequential = time.perf_counter() - t
  diff = max(float(np.abs(np.asarray(a)[k] - np.asarray(b)[0]).max())
             for k, tree in enumerate(looped)
             for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(tree)))
  print(f"backend={jax.default_backend()} experts={args.experts} epochs={args.epochs} "
        f"images={args.images} width={args.width} steps/epoch={spec.steps_per_epoch}")
  map_diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                 for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(mapped)))
  predict_seconds = {}
  for impl in ("vmap", "map"):
    training.predict(model, batched, np.asarray(images[:1000]), 1000, impl)  # compile
    t = time.perf_counter()
    training.predict(model, batched, np.asarray(images), 1000, impl)
    predict_seconds[impl] = time.perf_counter() - t
  print(f"vmap {t_vmapped:.2f}s  map {t_mapped:.2f}s  sequential {t_sequential:.2f}s  "
        f"max param diff {diff:.2e} (map vs vmap {map_diff:.2e})")
  print(f"predict {args.images} images: vmap {predict_seconds['vmap']:.2f}s "
        f"map {predict_seconds['map']:.2f}s")
  print(f"speedup={t_sequential / t_vmapped:.2f}")
  print(f"speedup_map={t_sequential / t_mapped:.2f}")
  print(f"predict_map_speedup={predict_seconds['vmap'] / predict_seconds['map']:.2f}")


if __name__ == "__main__":
  main()
