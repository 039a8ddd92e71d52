"""CIFAR-100-LT: the CIFAR-10-LT profiles with 100 classes.

  python -m launch.pipeline --config=configs/cifar100_lt.py:profile=cpu,ipc=1 --workdir=runs/c100
"""

from configs import cifar10_lt


def get_config(arg=None):
  return cifar10_lt.cifar_config(arg, "cifar100")
