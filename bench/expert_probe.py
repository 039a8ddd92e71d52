"""Validation accuracy per epoch of CIFAR-10/100-LT experts, to choose an expert profile that learns.

  python bench/expert_probe.py --lr=0.05 --width=32 --epochs=40 --imbalance_factor=100
  python bench/expert_probe.py --dataset=cifar100 --test=real --epochs=30 --imbalance_factor=50

Trains `--experts` experts (the `cpu` profile otherwise: PyTorch initialisation, plain SGD, batch
256, ZCA, DSA; the shared copy through the `folder` source, `--test` its test split: `holdout` as
every CIFAR-10 probe so far, `real` for the published LT counts) and prints, every 5 epochs, their mean
balanced validation accuracy and per-class validation accuracy (never the test split).
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--lr", type=float, default=0.05)
  parser.add_argument("--width", type=int, default=32)
  parser.add_argument("--epochs", type=int, default=40)
  parser.add_argument("--experts", type=int, default=2)
  parser.add_argument("--imbalance_factor", type=float, default=100.0)
  parser.add_argument("--dataset", default="cifar10", choices=("cifar10", "cifar100"))
  parser.add_argument("--test", default="holdout", choices=("holdout", "real"))
  parser.add_argument("--workdir", default="/tmp/ltdd_expert_probe")
  args = parser.parse_args()
  from configs import cifar10_lt  # pylint: disable=g-import-not-at-top
  from ltdd_jax.methods import analysis  # pylint: disable=g-import-not-at-top
  from ltdd_jax.run import pipeline  # pylint: disable=g-import-not-at-top
  c = cifar10_lt.cifar_config(f"profile=cpu,source=folder,test={args.test},"
                              f"imbalance_factor={args.imbalance_factor}", args.dataset)
  c.experts.num_experts, c.experts.epochs, c.experts.lr = args.experts, args.epochs, args.lr
  c.model.width = args.width
  c.method = "random"  # experts only: no distillation window to check against the epochs
  workdir = os.path.join(args.workdir, f"{args.dataset}_{args.test}_if{args.imbalance_factor:g}_"
                         f"lr{args.lr}_w{args.width}_e{args.epochs}_k{args.experts}")
  ctx = pipeline.setup(c, workdir)
  workdir, data = ctx.workdir, ctx.data
  start = time.time()
  expert_set, _ = pipeline.stage_experts(ctx)
  seconds = time.time() - start
  out = {}
  for epoch in sorted(set(range(0, args.epochs + 1, 5)) | {args.epochs}):
    per_class = analysis.expert_per_class_accuracy(
        expert_set, data.val_images, data.val_labels, epoch, c.evaluate.test_batch_size).mean(0)
    # The validation split is balanced: the mean of per-class accuracy is the accuracy.
    out[epoch] = {"val_acc": float(per_class.mean()), "per_class": per_class.tolist()}
    bands = [float(np.mean(b)) for b in np.array_split(per_class, 3)]  # label order = count order
    print(f"epoch {epoch:3d}: {out[epoch]['val_acc']:.1f}%  many/medium/few "
          f"{' / '.join(f'{b:.1f}' for b in bands)}  per class "
          f"{[round(x) for x in per_class[:20]]}{' ...' if len(per_class) > 20 else ''}",
          flush=True)
  print(f"training {args.experts} experts x {args.epochs} epochs took {seconds:.0f}s")
  with open(workdir / "probe.json", "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
