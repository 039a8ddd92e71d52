"""How the relabelling teacher labels the images of finished sets, without training any student.

  python bench/teacher_view.py --experts=runs/evidence/grid/if100_experts \
    --set mtt=runs/evidence/grid/if100_ipc10_mtt/synthetic.npz --set herding --set random

Opens the `unilevel` teacher of the `evidence` profile (CIFAR-10-LT, the shared JPEG copy) from an
expert folder that already holds its observers (`--experts`; it fails rather than train them;
`herding` needs the folder's flat experts too), normalises it with its recalibrated balanced
statistics as `evaluate.protocol=relabel` does, and prints, per set, the share of the set's own
unaugmented images the teacher puts in their class, per class and overall, where it puts them, and
its mean top probability (`evaluation.protocol.teacher_on_set`). A set the teacher does not
recognise is relabelled into other classes; one it does keeps its classes.
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--experts", required=True, help="expert folder holding the observers")
  parser.add_argument("--imbalance_factor", type=float, default=100.0)
  parser.add_argument("--test", default="holdout", choices=("real", "holdout"))
  parser.add_argument("--ipc", type=int, default=10, help="IPC of the random / herding sets")
  parser.add_argument("--set", action="append", default=[],
                      help="NAME=PATH/synthetic.npz, or random | herding | full")
  args = parser.parse_args()
  from configs import cifar10_lt  # pylint: disable=g-import-not-at-top
  from ltdd_jax.evaluation import protocol  # pylint: disable=g-import-not-at-top
  from ltdd_jax.methods import synthetic  # pylint: disable=g-import-not-at-top
  from ltdd_jax.run import pipeline, synthesize  # pylint: disable=g-import-not-at-top
  c = cifar10_lt.cifar_config(f"profile=evidence,source=folder,test={args.test},"
                              f"imbalance_factor={args.imbalance_factor}", "cifar10")
  c.method = "herding"  # the teacher and the flat experts herding selects with, both opened
  c.distill.ipc = args.ipc
  c.evaluate.protocol = "relabel"
  c.experts.directory = os.path.abspath(args.experts)
  with tempfile.TemporaryDirectory() as workdir:
    ctx = pipeline.setup(c, workdir, stages=())
    observers = synthesize.observer_directory(ctx)
    if not (observers / "meta.json").exists():  # never train them here
      sys.exit(f"No trained observers for these data and observer settings in {observers}; "
               "pass the expert folder of the run whose teacher to open.")
    teacher = pipeline.relabel_teacher(ctx)
    data = ctx.data
    print(f"class counts (head to tail): {data.counts.tolist()}")
    for item in args.set:
      name, _, path = item.partition("=")
      if path:
        syn = synthetic.DistilledSet.load(path, data.num_classes, data.image_shape)
        labelled = pipeline.synthetic_set(ctx, syn.with_rectified(None, {}))
      else:
        labelled = pipeline.baseline_set(ctx, name)
      view = protocol.teacher_on_set(teacher, labelled.images, labelled.labels, data.num_classes)
      per_class = " ".join(f"{a:.0f}" for a in view["teacher_set_per_class_acc"])
      share = " ".join(f"{a:.0f}" for a in view["teacher_set_pred_share"])
      print(f"{name}: {len(labelled)} images, teacher keeps {view['teacher_set_acc']:.1f}% in "
            f"their class (per class {per_class}); share predicted per class {share}; "
            f"mean top probability {view['teacher_set_confidence']:.1f}%")


if __name__ == "__main__":
  main()
