"""K experts trained as one program (vmap, or lax.map) vs the same K trained one after another.

  python bench/experts.py [--experts 8 --epochs 2 --images 2048 --width 32]

Same data (random CIFAR-shaped images), same epochs and per-expert keys; compile time is excluded
(every program is warmed up first). Then the ensemble's test-time logits (`ensemble.predict`) with
vmap vs lax.map. The last lines are `speedup=<sequential/vmap>`, `speedup_map=<sequential/map>` and
`predict_map_speedup=<vmap/map>`: what `model.ensemble_impl=auto` picks per backend rests on them.
"""

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import cifar10_lt
from ltdd_jax.core import ensemble
from ltdd_jax.methods import experts
from ltdd_jax.run import specs


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
  recipe = experts.recipe(specs.expert_spec(config), np.asarray(labels), 10)
  recipe = dataclasses.replace(recipe, num_models=args.experts)
  model, spec = recipe.model, recipe.train
  fns = {impl: ensemble.epoch_program(model, spec, impl) for impl in ("vmap", "map")}
  fn = fns["vmap"]
  states = ensemble.init_states(recipe, (32, 32, 3))
  data = {"images": images, "targets": labels, "labels": labels}
  lr = jnp.float32(config.experts.lr)
  keys = lambda e: jax.random.split(jax.random.key(e), args.experts)

  def together(impl):
    s = states
    for e in range(args.epochs):
      s, loss = fns[impl](s, keys(e), lr, data)
    return jax.block_until_ready(s["params"])

  def sequential():
    out = []
    for k in range(args.experts):
      s = jax.tree.map(lambda x: x[k:k + 1], states)
      for e in range(args.epochs):
        s, loss = fn(s, keys(e)[k:k + 1], lr, data)
      out.append(s["params"])
    return jax.block_until_ready(out)

  # Warm-up: compile both shapes (K and 1) on one epoch.
  for f in fns.values():
    jax.block_until_ready(f(states, keys(0), lr, data))
  jax.block_until_ready(fn(jax.tree.map(lambda x: x[:1], states), keys(0)[:1], lr, data))
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
    ensemble.predict(model, batched, np.asarray(images[:1000]), 1000, impl)  # compile
    t = time.perf_counter()
    ensemble.predict(model, batched, np.asarray(images), 1000, impl)
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
