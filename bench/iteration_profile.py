"""Where one outer iteration of trajectory matching spends its time, at a profile's settings.

  PYTHONPATH=. python bench/iteration_profile.py --profile=evidence \
      [--experts=runs/evidence/grid/if100_experts/flat] [--repeats=5] [--peak_gflops=157]

For the profile's student (ConvNet, width, syn_steps, batch_syn, DSA, remat) at IPC 10 on 10 classes,
each line is the best of `--repeats` runs of one compiled program:
  update     the meta-gradient: the student's unroll, the matching loss and its gradient w.r.t. the
             images and the lr (what every outer iteration computes; the optimiser step is
             negligible beside it);
  forward    the unroll and the loss alone, without gradient (the inner unroll's share);
  no_dsa     `update` with DSA off (DSA's share: 1 - no_dsa / update, forward and backward);
  dsa_alone  the augmentation of syn_steps minibatches alone, forward;
  loading    reading one (start, target) pair of expert epochs from the store, cold (an iteration
             reads one pair; prefetching overlaps it with the update).
`--compare_remat` also times `update` without remat and under other remat policies.
The meta-backward is update - forward. XLA's own FLOP count of `update` (cost analysis of one
inner step, times syn_steps, since XLA counts a loop body once) over its time gives the achieved
GFLOP/s; the last line prints it as a fraction of the machine's fp32 FMA
peak (`--peak_gflops`, 157 for the 2-core Zen 3 development machine).
"""

import argparse
import dataclasses
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from timing import best_of  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--profile", default="evidence")
  parser.add_argument("--experts", default="", help="an expert set folder (flat); '' = synthetic")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--peak_gflops", type=float, default=157.0)
  parser.add_argument("--compare_remat", action="store_true",
                      help="also time `update` without remat and under each remat policy")
  args = parser.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import cifar10_lt  # pylint: disable=g-import-not-at-top
  from ltdd_jax import checkpoints, models  # pylint: disable=g-import-not-at-top
  from ltdd_jax.core import augment, ensemble, matching  # pylint: disable=g-import-not-at-top
  from ltdd_jax.methods import experts  # pylint: disable=g-import-not-at-top
  from ltdd_jax.run import specs  # pylint: disable=g-import-not-at-top

  c = cifar10_lt.get_config(f"profile={args.profile},source=folder,ipc=10")
  d = c.distill
  inner = specs.inner(c)  # the profile's student: syn_steps, batch_syn, remat, DSA
  dsa = specs.dsa(c, True)
  model = models.make_classifier(specs.model(c), 10)
  apply_fn = ensemble.make_apply(model)
  n = 10 * d.ipc
  images = jax.random.normal(jax.random.key(1), (n, 32, 32, 3))
  labels = jnp.arange(n) % 10
  lr = jnp.float32(d.syn_lr_init)
  if not args.experts:  # A small synthetic store with the profile's parameter shapes.
    args.experts = tempfile.mkdtemp()
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    for e in range(4):
      checkpoints.save_tree(experts.trajectory_path(args.experts, 0, e),
                            jax.tree.map(lambda p, e=e: np.asarray(p) + 0.01 * e, params))
    experts.write_meta(args.experts, experts.Labelling(10), 1, 3)
  store = experts.ExpertSet.open(args.experts, model)
  start = store.load_epoch(0, 0)
  target = store.load_epoch(0, min(store.epochs, d.expert_epochs))

  def loss(spec, x, l):
    return matching.trajectory_matching_loss(matching.Student(apply_fn, spec),
                                             {"images": x, "targets": labels, "lr": l},
                                             {"start": start, "target": target}, jax.random.key(2))

  def grad_fn(with_dsa: bool, syn_steps: int = d.syn_steps, remat: bool = d.remat,
              policy: str = d.remat_policy):
    spec = dataclasses.replace(inner, syn_steps=syn_steps, remat=remat, remat_policy=policy,
                               augment=inner.augment if with_dsa else None)
    return jax.jit(jax.grad(lambda x, l: loss(spec, x, l), argnums=(0, 1)))

  forward = jax.jit(lambda x, l: loss(inner, x, l))
  update = grad_fn(d.dsa)
  no_dsa = grad_fn(False)
  batch = min(d.batch_syn, n)
  dsa_alone = jax.jit(lambda x, k: jax.lax.map(
      lambda kk: augment.augment(kk, x[:batch], dsa).sum(), jax.random.split(k, d.syn_steps)))

  # XLA counts a loop body once, whatever its trip count: count one inner step (a one-step scan,
  # which XLA unrolls) and multiply.
  cost = grad_fn(d.dsa, 1).lower(images, lr).compile().cost_analysis()
  flops = (cost[0] if isinstance(cost, list) else cost).get("flops", float("nan")) * d.syn_steps
  times = {
      "update": best_of(lambda: jax.block_until_ready(update(images, lr)), args.repeats),
      "forward": best_of(lambda: jax.block_until_ready(forward(images, lr)), args.repeats),
      "no_dsa": best_of(lambda: jax.block_until_ready(no_dsa(images, lr)), args.repeats),
      "dsa_alone": best_of(lambda: jax.block_until_ready(dsa_alone(images, jax.random.key(3))),
                           args.repeats),
  }
  rng = np.random.default_rng(0)

  def load_pair():
    k, s = int(rng.integers(store.num_experts)), int(rng.integers(store.epochs - 1))
    store.load_epoch(k, s), store.load_epoch(k, s + 1)
  times["loading"] = best_of(load_pair, args.repeats)

  u = times["update"]
  print(f"profile={args.profile} width={c.model.width} syn_steps={d.syn_steps} "
        f"batch_syn={d.batch_syn} ipc={d.ipc} dsa={d.dsa} backend={jax.default_backend()}")
  for name, t in times.items():
    print(f"{name:10s} {t:8.3f} s  ({100 * t / u:5.1f}% of update)")
  print(f"meta-backward (update - forward) {u - times['forward']:.3f} s "
        f"({100 * (u - times['forward']) / u:.1f}%); DSA share of update "
        f"{100 * (1 - times['no_dsa'] / u):.1f}%")
  achieved = flops / u / 1e9
  print(f"XLA flops of update {flops / 1e9:.2f} GFLOP; achieved {achieved:.1f} GFLOP/s")
  if args.compare_remat:  # side by side with the profile's setting (remat, nothing_saveable)
    for name, remat, policy in [("no remat", False, d.remat_policy),
                                ("dots_saveable", True, "dots_saveable"),
                                ("everything_saveable", True, "everything_saveable")]:
      fn = grad_fn(d.dsa, remat=remat, policy=policy)
      t = best_of(lambda fn=fn: jax.block_until_ready(fn(images, lr)), args.repeats)
      print(f"update with {name:20s} {t:.3f} s  ratio to the profile's {t / u:.3f}")
  print(f"update_s={u:.3f} dsa_share={1 - times['no_dsa'] / u:.3f} "
        f"forward_share={times['forward'] / u:.3f} loading_share={times['loading'] / u:.3f} "
        f"peak_fraction={achieved / args.peak_gflops:.3f}")


if __name__ == "__main__":
  main()
