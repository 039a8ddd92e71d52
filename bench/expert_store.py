"""Host memory and time per distillation iteration: every expert epoch in memory vs read on demand.

  python bench/expert_store.py --store=/tmp/expert_store          # 100 experts x 50 epochs, w128
  python bench/expert_store.py --store=/tmp/s --experts=10 --epochs=10 --width=32   # quick

Writes a synthetic expert store (ConvNet-3 parameters, per-epoch layout) once, then runs two child
processes side by side, one after the other: `eager` stacks every trajectory in memory
(`ExpertSet.load_all`, what distillation did before) and `lazy` reads the sampled (expert, epoch)
pairs through `TrajectoryReader`. Each child draws the same pairs and runs the same MTT updates,
and prints its peak RSS and seconds per iteration; the parent prints the ratios.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def write_store(path, experts, epochs, width):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ltdd_jax import checkpoints, models  # pylint: disable=g-import-not-at-top
  from ltdd_jax.methods import experts as experts_lib  # pylint: disable=g-import-not-at-top
  if os.path.exists(os.path.join(path, "meta.json")):
    return
  model = models.make_classifier(models.ModelSpec(width=width), 10)
  params = jax.tree.map(np.asarray, model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"])
  rng = np.random.default_rng(0)
  for k in range(experts):
    for e in range(epochs + 1):
      step = jax.tree.map(lambda x: (x + 0.01 * e * rng.standard_normal(x.shape)).astype(x.dtype),
                          params)
      checkpoints.save_tree(experts_lib.trajectory_path(path, k, e), step)
  experts_lib.write_meta(path, experts_lib.Labelling(10), experts, epochs)


class InMemory:
  """The eager baseline: every (expert, epoch) read into memory up front."""

  def __init__(self, expert_set):
    self.num_experts, self.num_epochs = expert_set.num_experts, expert_set.epochs
    self.trees = {(k, e): expert_set.load_epoch(k, e) for k in range(self.num_experts)
                  for e in range(self.num_epochs + 1)}

  def get(self, k, epoch):
    return self.trees[(k, epoch)]


def child(mode, path, width, iterations):
  import dataclasses  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  from ltdd_jax import models, parallel, reporting  # pylint: disable=g-import-not-at-top
  from ltdd_jax.methods import distill, experts  # pylint: disable=g-import-not-at-top
  from ltdd_jax.run import specs  # pylint: disable=g-import-not-at-top
  config = common.base_config()
  config.model.width = width
  config.distill.syn_steps, config.distill.batch_syn = 10, 100
  expert_set = experts.ExpertSet.open(path, models.make_classifier(specs.model(config), 10))
  config.distill.iterations, config.distill.log_every = iterations + 1, 1
  config.distill.max_start_epoch, config.distill.expert_epochs = expert_set.epochs - 2, 2
  method = specs.method(config)
  source = distill.ExpertSource(expert_set, None, np.arange(10), np.ones(10))
  objective = distill.make_objective(source, specs.matching_options(config, method))
  t0 = time.perf_counter()
  trajectories = InMemory(expert_set) if mode == "eager" else experts.TrajectoryReader(expert_set)
  load_seconds = time.perf_counter() - t0
  objective = dataclasses.replace(objective, experts=trajectories)
  syn = {"images": np.random.default_rng(0).normal(size=(100, 32, 32, 3)).astype(np.float32),
         "labels": np.repeat(np.arange(10), 10).astype(np.int32),
         "log_lr": np.float32(np.log(0.01))}
  workdir = tempfile.mkdtemp()
  metrics = reporting.MetricsWriter(workdir)
  distill.run_distillation(specs.distill_spec(config, method), [objective], syn,
                           os.path.join(workdir, "distill_ckpt"),
                           parallel.make_mesh(config.mesh.num_devices), metrics=metrics)
  seconds = [line["seconds"] for line in metrics.lines()]
  times = np.diff(seconds)  # iteration 0 compiles
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
  print(json.dumps({"mode": mode, "peak_rss_gib": rss, "load_seconds": load_seconds,
                    "seconds_per_iteration": float(np.median(times))}))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--store", default="/tmp/ltdd_expert_store")
  parser.add_argument("--experts", type=int, default=100)
  parser.add_argument("--epochs", type=int, default=50)
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--iterations", type=int, default=5)
  parser.add_argument("--child", default="")
  args = parser.parse_args()
  if args.child:
    child(args.child, args.store, args.width, args.iterations)
    return
  t = time.perf_counter()
  write_store(args.store, args.experts, args.epochs, args.width)
  print(f"store: {args.experts} experts x {args.epochs + 1} epochs, width {args.width}, "
        f"{args.store} (written in {time.perf_counter() - t:.0f}s)")
  results = {}
  for mode in ("eager", "lazy"):
    out = subprocess.run([sys.executable, __file__, f"--child={mode}", f"--store={args.store}",
                          f"--width={args.width}", f"--iterations={args.iterations}"],
                         capture_output=True, text=True, check=True)
    results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print(results[mode])
  eager, lazy = results["eager"], results["lazy"]
  print(f"rss_ratio={lazy['peak_rss_gib'] / eager['peak_rss_gib']:.3f} "
        f"time_ratio={lazy['seconds_per_iteration'] / eager['seconds_per_iteration']:.3f} "
        f"(lazy / eager)")


if __name__ == "__main__":
  main()
