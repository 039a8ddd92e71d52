"""Where the statistics-matching observers' training time goes, side by side in one run.

  python bench/observer_speed.py [--steps 40 --width 32 --repeats 2]

Times one epoch of `--steps` SGD steps of the observer and the teacher (the `evidence` profile's
`unilevel` observer recipe: two batch-norm ConvNet-3 networks in one program, batch 64, two mixed
views, DSA) on random 32x32x3 images, after a compiling epoch, with each variant below changed
alone:
- `im2col` / `xla`: the convolution (`model.conv_impl`; `auto` takes im2col for CPU training);
- `no_dsa`: the DSA augmentation of the batch and its partner batch off (its share of the step);
- `one_network`: one network alone (what the second network costs in the one program);
- `vmap`: both networks batched by `jax.vmap` instead of one after the other (`lax.map`);
- `batch_B`: batches of B images (`unilevel.observer_batch_size`; `--batch_sizes`), timed per
  image, since an epoch of B-image batches has 64 / B as many steps.
Prints seconds per step of each and its ratio to the default's (`ratio=`, below 1: faster); the
`batch_B` rows' ratio is per image (what an epoch of the same images costs).
"""

import argparse
import dataclasses
import os
import sys
import time
import types

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--width", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--batch_sizes", type=str, default="128,256")
  args = parser.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import cifar10_lt  # pylint: disable=g-import-not-at-top
  from ltdd_jax.core import ensemble  # pylint: disable=g-import-not-at-top
  from ltdd_jax.run import specs  # pylint: disable=g-import-not-at-top

  base = cifar10_lt.cifar_config("profile=evidence,source=folder,test=holdout", "cifar10")
  base.method = "unilevel"
  base.model.width = args.width
  # A long-tailed set of `--steps` batches of 64 (at least one image per class).
  counts = np.maximum(np.array([40, 30, 20, 10, 8, 6, 4, 3, 2, 1]) * 64 * args.steps // 124, 1)
  labels = np.repeat(np.arange(10), counts)
  images = np.random.default_rng(0).normal(size=(len(labels), 32, 32, 3)).astype(np.float32)
  data_view = types.SimpleNamespace(train_labels=labels, num_classes=10)

  def epoch_seconds(config, num_models=2, ensemble_impl=None):
    recipe, _ = specs.observer_recipe(config, data_view)
    recipe = dataclasses.replace(recipe, num_models=num_models,
                                 ensemble_impl=ensemble_impl or recipe.ensemble_impl)
    program = ensemble.epoch_program(recipe.model, recipe.train, recipe.ensemble_impl,
                                     recipe.kernel)
    states = ensemble.init_states(recipe, images.shape[1:])
    data = {"images": jnp.asarray(images), "labels": jnp.asarray(labels),
            "targets": jnp.asarray(labels), "epoch": jnp.int32(0)}
    keys = recipe.keys(0, num_models)
    jax.block_until_ready(program(states, keys, jnp.float32(0.01), data))  # compiles
    best = float("inf")
    for _ in range(args.repeats):
      start = time.perf_counter()
      jax.block_until_ready(program(states, keys, jnp.float32(0.01), data))
      best = min(best, time.perf_counter() - start)
    return best / recipe.train.steps_per_epoch, recipe.train.steps_per_epoch

  def variant(conv_impl="im2col", **unilevel):
    """The base config with `model.conv_impl` and the given `unilevel` keys set."""
    c = base.copy_and_resolve_references()
    c.model.conv_impl = conv_impl
    c.unilevel.update(unilevel)
    return c

  variants = {name: epoch_seconds(variant(name)) for name in ("im2col", "xla")}
  variants["no_dsa"] = epoch_seconds(variant(observer_dsa=False))
  variants["one_network"] = epoch_seconds(variant(), num_models=1)
  variants["vmap"] = epoch_seconds(variant(), ensemble_impl="vmap")
  per_image = {}
  for batch in (int(b) for b in args.batch_sizes.split(",") if b):
    variants[f"batch_{batch}"] = epoch_seconds(variant(observer_batch_size=batch))
    per_image[f"batch_{batch}"] = base.unilevel.observer_batch_size / batch
  reference = variants["im2col"][0]
  print(f"{len(labels)} images, batch {base.unilevel.observer_batch_size}, width {args.width}, "
        f"{jax.devices()[0].platform}")
  for name, (seconds, steps) in variants.items():
    ratio = seconds * per_image.get(name, 1.0) / reference
    print(f"{name}: {1e3 * seconds:.1f} ms per step ({steps} steps)  ratio={ratio:.2f}"
          + ("  (per image)" if name in per_image else ""))


if __name__ == "__main__":
  main()
