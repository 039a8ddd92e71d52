"""Balanced validation accuracy of the statistics-matching observer and teacher as they train.

  python bench/observer_probe.py --dataset=cifar10 --imbalance_factor=100 --epochs=60 --every=5
  python bench/observer_probe.py --dataset=cifar10 --test=holdout --epochs=40 --every=5
  python bench/observer_probe.py --dataset=digits --epochs=20 --every=5

Trains (or reopens) the observers of `method=unilevel` at the `evidence` profile (any
`--config.unilevel.observer_*` value as `--set key=value`), then, every `--every` epochs, normalises
each network with its recalibrated balanced batch-norm statistics (as synthesis and relabelling
use them) and prints its accuracy on the validation split (never the test split), with the
per-class accuracy. What `unilevel.observer_epochs` to choose rests on it.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--dataset", default="cifar10", choices=("cifar10", "cifar100", "digits"))
  parser.add_argument("--imbalance_factor", type=float, default=100.0)
  parser.add_argument("--test", default="real", choices=("real", "holdout"),
                      help="the CIFAR test split the validation split is taken beside")
  parser.add_argument("--epochs", type=int, default=60)
  parser.add_argument("--every", type=int, default=5)
  parser.add_argument("--set", action="append", default=[],
                      help="unilevel.KEY=VALUE overrides, e.g. --set observer_batch_size=128")
  parser.add_argument("--workdir", default="/tmp/ltdd_observer_probe")
  args = parser.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import cifar10_lt, digits_lt  # pylint: disable=g-import-not-at-top
  from ltdd_jax.core import ensemble  # pylint: disable=g-import-not-at-top
  from ltdd_jax.methods import experts  # pylint: disable=g-import-not-at-top
  from ltdd_jax.run import pipeline, synthesize  # pylint: disable=g-import-not-at-top
  if args.dataset == "digits":
    c = digits_lt.get_config()
  else:
    c = cifar10_lt.cifar_config(f"profile=evidence,source=folder,"
                                f"test={args.test},imbalance_factor={args.imbalance_factor}",
                                args.dataset)
  c.method = "unilevel"
  c.unilevel.observer_epochs = args.epochs
  for item in args.set:
    key, _, value = item.partition("=")
    c.unilevel[key] = type(c.unilevel[key])(value)
  name = "_".join([args.dataset, args.test, f"if{c.data.imbalance_factor:g}", f"e{args.epochs}",
                   *args.set])
  ctx = pipeline.setup(c, os.path.join(args.workdir, name.replace("=", "")))
  start = time.time()
  classifier, _ = synthesize.stage_observers(ctx)
  seconds = time.time() - start
  observers = experts.ExpertSet.open(synthesize.observer_directory(ctx), classifier)
  data = ctx.data
  for epoch in sorted(set(range(0, args.epochs + 1, args.every)) | {args.epochs}):
    params = observers.at_epoch(epoch)
    line = []
    for k, role in enumerate(("observer", "teacher")):
      own, _, stored, batch_stats = synthesize.calibrated(ctx, classifier, params, k)
      apply = jax.jit(lambda x, own=own, stats=batch_stats: stored.apply(
          {"params": own, "batch_stats": stats}, x))
      logits = ensemble.batched(apply, data.val_images)
      correct = logits.argmax(-1) == data.val_labels
      per_class = [100 * correct[data.val_labels == c].mean() for c in range(data.num_classes)]
      line.append(f"{role} {np.mean(per_class):.1f}% per class {[round(x) for x in per_class]}")
    print(f"epoch {epoch:3d}: " + "; ".join(line), flush=True)
  print(f"training the observer and the teacher x {args.epochs} epochs took {seconds:.0f}s")


if __name__ == "__main__":
  main()
