"""Validation accuracy per epoch of CIFAR-10-LT experts, to choose an expert profile that learns.

  python bench/expert_probe.py --lr=0.05 --width=32 --epochs=40 --imbalance_factor=100

Trains `--experts` experts (the `cpu` profile otherwise: PyTorch initialisation, plain SGD, batch
256, ZCA, DSA; shared JPEG copy through the `folder` source) and prints, every 5 epochs, their mean
balanced validation accuracy and per-class validation accuracy (never the test split).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--lr", type=float, default=0.05)
  parser.add_argument("--width", type=int, default=32)
  parser.add_argument("--epochs", type=int, default=40)
  parser.add_argument("--experts", type=int, default=2)
  parser.add_argument("--imbalance_factor", type=float, default=100.0)
  parser.add_argument("--workdir", default="/tmp/ltdd_expert_probe")
  args = parser.parse_args()
  from configs import cifar10_lt  # pylint: disable=g-import-not-at-top
  from ltdd_jax.methods import analysis  # pylint: disable=g-import-not-at-top
  from ltdd_jax.run import pipeline  # pylint: disable=g-import-not-at-top
  c = cifar10_lt.get_config(f"profile=cpu,source=folder,imbalance_factor={args.imbalance_factor}")
  c.experts.num_experts, c.experts.epochs, c.experts.lr = args.experts, args.epochs, args.lr
  c.model.width = args.width
  c.method = "random"  # experts only: no distillation window to check against the epochs
  workdir = os.path.join(args.workdir, f"if{args.imbalance_factor:g}_lr{args.lr}_w{args.width}_"
                         f"e{args.epochs}_k{args.experts}")
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
    print(f"epoch {epoch:3d}: {out[epoch]['val_acc']:.1f}%  per class "
          f"{[round(x) for x in per_class]}", flush=True)
  print(f"training {args.experts} experts x {args.epochs} epochs took {seconds:.0f}s")
  with open(workdir / "probe.json", "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
