"""ImageNet-LT from its list files (`relative/path label` lines), resized to `image_size`.

  python -m launch.pipeline --config=configs/imagenet_lt.py:profile=cpu \
      --config.data.train_path=/data/ImageNet_LT_train.txt \
      --config.data.test_path=/data/ImageNet_LT_test.txt \
      --config.data.image_root=/data/imagenet --workdir=runs/imagenet_lt

The list files already are long-tailed, so the profile is not re-applied (imbalance_factor 1 keeps
every listed image, n_max caps nothing); many/medium/few use the ImageNet-LT thresholds.
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, profile="cpu", ipc=1)
  c = common.base_config()
  c.profile = args.profile
  c.data.dataset = "imagenet_lt"
  c.data.train_source, c.data.test_source = "listfile", "listfile"
  c.data.imbalance_factor = 1.0
  c.data.n_max = 0
  c.data.validation_per_class = 0
  c.data.shot_rule = "thresholds"
  c.data.normalize, c.data.zca = True, False
  c.distill.ipc = args.ipc
  if args.profile == "cpu":
    c.data.image_size = 32
    c.model.depth, c.model.width = 3, 32
    c.experts.num_experts, c.experts.epochs, c.experts.batch_size = 2, 5, 256
    c.distill.syn_steps, c.distill.max_start_epoch, c.distill.iterations = 10, 3, 100
    c.distill.batch_syn = 200
    c.evaluate.num_models, c.evaluate.epochs, c.evaluate.full_epochs = 2, 100, 5
    c.evaluate.cross_arch_width = 16
  elif args.profile == "paper":
    c.data.image_size = 64
    c.model.depth, c.model.width = 4, 128
    c.experts.num_experts, c.experts.epochs, c.experts.batch_size = 100, 50, 256
    c.distill.syn_steps, c.distill.max_start_epoch, c.distill.iterations = 40, 20, 5000
    c.distill.lr_img, c.distill.batch_syn = 1000.0, 500
    c.evaluate.num_models, c.evaluate.epochs, c.evaluate.full_epochs = 5, 1000, 90
  else:
    raise ValueError(f"profile must be 'cpu' or 'paper', got {args.profile!r}.")
  c.lock()
  return c
