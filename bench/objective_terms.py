"""Each matching objective's terms at the initial synthetic set, and how each pulls the student lr.

  PYTHONPATH=. python bench/objective_terms.py --method=ltdd+hierarchical \
      --experts=runs/evidence/grid/if100_experts [--profile=evidence] [--imbalance_factor=100] \
      [--ed_min_imbalance=1] [--pairs=3]

Builds the run's objectives as the pipeline does (flat, or the hierarchical stages), from an
existing expert root (`experts.directory`: flat experts, classifier experts and the grouping's
experts are trained there if missing), and prints for each objective, averaged over `--pairs`
sampled (start, target) pairs at syn_lr = `distill.syn_lr_init`:
  - each term's normalised matching distance (backbone and classifier terms under LTDD's ED, the
    whole network otherwise): 1 means the student ends as far from the target as it started;
  - the term's derivative w.r.t. log(syn_lr): positive pushes the learned lr down;
  - under ED, how far the classifier experts' heads move over the matched window (L2), the
    denominator of the classifier term, beside the experts' own head move.
`--ed_min_imbalance=1` puts ED's classifier term on every hierarchical objective (what the
plugin did before `grouping.ed_min_imbalance`); the default keeps the config's value.
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def head_move(expert_set, start: int, epochs: int) -> float:
  """Mean over experts of the L2 distance their head parameters move from `start` over `epochs`."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  return float(np.mean([
      optax.tree_utils.tree_l2_norm(jax.tree.map(
          np.subtract, expert_set.load_epoch(k, start + epochs)["head"],
          expert_set.load_epoch(k, start)["head"]))
      for k in range(expert_set.num_experts)]))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--method", default="ltdd+hierarchical")
  parser.add_argument("--experts", required=True, help="the expert root (experts.directory)")
  parser.add_argument("--profile", default="evidence")
  parser.add_argument("--imbalance_factor", type=float, default=100.0)
  parser.add_argument("--ipc", type=int, default=10)
  parser.add_argument("--ed_min_imbalance", type=float, default=0.0,
                      help="overrides grouping.ed_min_imbalance when > 0")
  parser.add_argument("--pairs", type=int, default=3)
  args = parser.parse_args()
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import cifar10_lt  # pylint: disable=g-import-not-at-top
  from ltdd_jax.methods import synthetic  # pylint: disable=g-import-not-at-top
  from ltdd_jax.run import pipeline  # pylint: disable=g-import-not-at-top

  c = cifar10_lt.get_config(f"profile={args.profile},source=folder,test=holdout,"
                            f"imbalance_factor={args.imbalance_factor},method={args.method},"
                            f"ipc={args.ipc}")
  c.unlock()
  c.experts.directory = args.experts
  if args.ed_min_imbalance > 0:
    c.grouping.ed_min_imbalance = args.ed_min_imbalance
  c.lock()
  d = c.distill
  with tempfile.TemporaryDirectory() as workdir:
    ctx = pipeline.setup(c, workdir)
    expert_set, classifier_set = pipeline.stage_experts(ctx)
    init, _ = synthetic.initial_synthetic(ctx.specs.init, ctx.data, expert_set, classifier_set)
    if ctx.method.hierarchical:
      objectives = pipeline.hierarchical_objectives(ctx, pipeline.stage_grouping(ctx))
    else:
      objectives = [pipeline.flat_objective(ctx, expert_set, classifier_set)]
  targets = synthetic.targets_of({k: jnp.asarray(v) for k, v in init.items()})
  rng = np.random.default_rng(0)
  log_lr = jnp.log(d.syn_lr_init)
  print(f"{args.method}, IF {args.imbalance_factor:g}, IPC {args.ipc}, syn_lr {d.syn_lr_init}, "
        f"{args.pairs} pairs; per term: distance, d distance / d log(syn_lr)")
  for o in objectives:
    terms = ("backbone", "classifier") if o.classifier_experts is not None else ("whole",)
    values = {t: [] for t in terms}
    for p in range(args.pairs):
      pair = jax.tree.map(jnp.asarray, o.sample(rng, 0, d.max_start_epoch, d.expert_epochs))
      for term in terms:
        only = o if term == "whole" else dataclasses.replace(o, ed=dataclasses.replace(
            o.ed, backbone_weight=float(term == "backbone"),
            classifier_weight=float(term == "classifier")))
        fn = lambda lr, only=only, pair=pair, p=p: only.loss(
            {"images": init["images"], "targets": targets, "lr": jnp.exp(lr)}, pair,
            jax.random.key(p))
        values[term].append([float(x) for x in jax.value_and_grad(fn)(log_lr)])
    line = "  ".join(f"{t} {np.mean(values[t], 0)[0]:.3f} / {np.mean(values[t], 0)[1]:+.3f}"
                     for t in terms)
    move = ""
    if o.classifier_experts is not None:
      move = (f"  head move: classifier experts {head_move(o.classifier_experts.expert_set, 0, d.expert_epochs):.3f}"
              f", experts {head_move(o.experts.expert_set, 0, d.expert_epochs):.3f}")
    print(f"{o.name:9s} syn_steps {o.syn_steps:2d}  {line}{move}", flush=True)


if __name__ == "__main__":
  main()
