"""Architectures by name; every classifier is `Classifier(backbone, head)`.

Parameters are plain pytrees {'backbone': ..., 'head': ...} with no mutable state (instance norm, or
batch norm on current-batch statistics), so a student can be unrolled and differentiated through.
"""

from __future__ import annotations

import flax.linen as nn

from ltdd_jax import errors
from ltdd_jax.models.alexnet import AlexNet
from ltdd_jax.models.convnet import ConvNet
from ltdd_jax.models.layers import INITS, Dense, resolve_conv_impl
from ltdd_jax.models.resnet import ResNet18
from ltdd_jax.models.vgg import VGG11

ARCHS = ("convnet", "resnet18", "vgg11", "alexnet")


class Classifier(nn.Module):
  """backbone(images) -> head(features). images [N, H, W, C] -> logits (or a tuple of them)."""
  backbone: nn.Module
  head: nn.Module

  def __call__(self, images):
    return self.head(self.backbone(images))


def make_backbone(model_config, arch: str | None = None, width: int | None = None) -> nn.Module:
  """The backbone named by `arch` (default `model.name`) with the config's norm and conv impl."""
  arch = arch or model_config.name
  width = width or model_config.width
  impl, init = model_config.conv_impl, model_config.init
  if arch == "convnet":
    return ConvNet(depth=model_config.depth, width=width, norm=model_config.norm, conv_impl=impl,
                   init=init)
  if arch == "resnet18":
    return ResNet18(width=width, norm=model_config.norm, conv_impl=impl, init=init)
  if arch == "vgg11":
    return VGG11(width=width, norm=model_config.norm, conv_impl=impl, init=init)
  if arch == "alexnet":
    return AlexNet(width=width, conv_impl=impl, init=init)
  raise errors.InputError(f"Unknown architecture {arch!r}; accepted: {ARCHS}.")


def make_head(model_config, num_outputs: int) -> nn.Module:
  """A linear head with `num_outputs` outputs (classes, groups, or a group's classes)."""
  return Dense(num_outputs, init=model_config.init)


def make_classifier(model_config, num_classes: int, arch: str | None = None,
                    width: int | None = None) -> Classifier:
  """Backbone plus a linear head with `num_classes` outputs."""
  return Classifier(make_backbone(model_config, arch, width), make_head(model_config, num_classes))


def for_inference(model: Classifier) -> Classifier:
  """The same classifier (same parameters) with an `auto` convolution resolved for a forward pass
  only, which on CPU is XLA's own convolution rather than the im2col form training needs."""
  backbone = model.backbone
  if getattr(backbone, "conv_impl", None) == "auto":
    backbone = backbone.clone(conv_impl=resolve_conv_impl("auto", inference=True))
  return model.clone(backbone=backbone)


__all__ = ["ARCHS", "INITS", "AlexNet", "Classifier", "ConvNet", "Dense", "ResNet18", "VGG11",
           "for_inference", "make_backbone", "make_classifier", "make_head",
           "resolve_conv_impl"]
