"""Expert training with glibc's default malloc vs `host_memory.retain_freed_buffers`, side by side.

  python bench/host_memory.py [--rounds 2 --experts 5 --epochs 3 --images 4096]

Each round runs the same workload in two fresh processes, one per setting, in alternating order:
K experts trained as one program (`ensemble.epoch_program`, the CPU's `map` ensemble) on random
CIFAR-shaped images, compile excluded, then the ensemble's logits on the images. Every child
prints its seconds and its minor page faults (`getrusage`); the last lines are the medians and
`speedup_<mode>=<default / mode>` for training and prediction.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MODES = ("default", "retain", "hugepages")
# `hugepages`: `retain` in a process started with glibc's transparent-huge-page tunable, so malloc's
# large buffers fault in 2 MiB at a time (the kernel's THP mode must be `madvise` or `always`).
HUGEPAGE_ENV = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def child(args) -> dict:
  """Times the workload in this process under `args.mode`; returns seconds and page faults."""
  from ltdd_jax import host_memory  # pylint: disable=g-import-not-at-top
  if args.mode in ("retain", "hugepages"):
    assert host_memory.retain_freed_buffers(), "not glibc: nothing to compare"
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import cifar10_lt  # pylint: disable=g-import-not-at-top
  from ltdd_jax.core import ensemble  # pylint: disable=g-import-not-at-top
  from ltdd_jax.methods import experts  # pylint: disable=g-import-not-at-top
  from ltdd_jax.run import specs  # pylint: disable=g-import-not-at-top
  config = cifar10_lt.get_config("profile=evidence")
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(args.images, 32, 32, 3)).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, 10, args.images).astype(np.int32))
  recipe = experts.recipe(specs.expert_spec(config), np.asarray(labels), 10)
  recipe = dataclasses.replace(recipe, num_models=args.experts)
  program = ensemble.epoch_program(recipe.model, recipe.train, "map")
  states = ensemble.init_states(recipe, (32, 32, 3))
  data = {"images": images, "targets": labels, "labels": labels}
  lr = jnp.float32(config.experts.lr)
  keys = lambda e: jax.random.split(jax.random.key(e), args.experts)
  jax.block_until_ready(program(states, keys(0), lr, data))  # compile
  ensemble.predict(recipe.model, states["params"], np.asarray(images[:1000]), 1000, "map")
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  start = time.perf_counter()
  for epoch in range(args.epochs):
    states, _ = program(states, keys(epoch), lr, data)
  jax.block_until_ready(states["params"])
  train = time.perf_counter() - start
  start = time.perf_counter()
  ensemble.predict(recipe.model, states["params"], np.asarray(images), 1000, "map")
  predict = time.perf_counter() - start
  return {"mode": args.mode, "train_s": train, "predict_s": predict,
          "page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--experts", type=int, default=5)
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--images", type=int, default=4096)
  parser.add_argument("--mode", choices=MODES, default=None, help="(internal) one child run")
  args = parser.parse_args()
  if args.mode is not None:
    print(json.dumps(child(args)))
    return
  results = {m: [] for m in MODES}
  for r in range(args.rounds):
    for mode in (MODES if r % 2 == 0 else MODES[::-1]):
      cmd = [sys.executable, __file__, f"--mode={mode}", f"--experts={args.experts}",
             f"--epochs={args.epochs}", f"--images={args.images}"]
      env = {**os.environ, **(HUGEPAGE_ENV if mode == "hugepages" else {})}
      out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
      row = json.loads(out.strip().splitlines()[-1])
      results[mode].append(row)
      print(f"round {r + 1} {mode:7s} train {row['train_s']:.2f}s predict {row['predict_s']:.2f}s "
            f"page faults {row['page_faults']}", flush=True)
  med = {m: {k: statistics.median(r[k] for r in rows) for k in ("train_s", "predict_s",
                                                              "page_faults")}
         for m, rows in results.items()}
  print(f"experts={args.experts} epochs={args.epochs} images={args.images}; medians: "
        + "; ".join(f"{m} train {v['train_s']:.2f}s predict {v['predict_s']:.2f}s "
                    f"faults {v['page_faults']:.0f}" for m, v in med.items()))
  for mode in MODES[1:]:
    print(f"speedup_{mode}={med['default']['train_s'] / med[mode]['train_s']:.3f}")
    print(f"predict_speedup_{mode}={med['default']['predict_s'] / med[mode]['predict_s']:.3f}")


if __name__ == "__main__":
  main()
