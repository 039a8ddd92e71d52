"""Architectures by name; every classifier is `Classifier(backbone, head)`.

Parameters are plain pytrees {'backbone': ..., 'head': ...} with no mutable state (instance norm, or
batch norm on current-batch statistics), so a student can be unrolled and differentiated through.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from ltdd_jax import errors
from ltdd_jax.models.alexnet import AlexNet
from ltdd_jax.models.convnet import ConvNet
from ltdd_jax.models.layers import INITS, Dense, resolve_conv_impl
from ltdd_jax.models.resnet import ResNet18
from ltdd_jax.models.vgg import VGG11

ARCHS = ("convnet", "resnet18", "vgg11", "alexnet")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The architecture a run trains (`config.model`, DESIGN §2).

  Attributes:
    name: one of ARCHS.
    depth, width: ConvNet depth; base width of every architecture.
    norm: `instance`, `batch` (current-batch statistics) or `none`.
    init: `torch` (PyTorch's default initialisation) or `flax`.
    conv_impl: `auto`, `xla` or `im2col` (`layers.resolve_conv_impl`).
    ensemble_impl: how K networks run in one program (`core.ensemble.over_ensemble`).
  """
  name: str = "convnet"
  depth: int = 3
  width: int = 128
  norm: str = "instance"
  init: str = "torch"
  conv_impl: str = "auto"
  ensemble_impl: str = "auto"


class Classifier(nn.Module):
  """backbone(images) -> head(features). images [N, H, W, C] -> logits (or a tuple of them)."""
  backbone: nn.Module
  head: nn.Module

  def __call__(self, images):
    return self.head(self.backbone(images))


class MultiHead(nn.Module):
  """Several linear heads on one feature vector, their logits concatenated: [N, F] ->
  [N, sum(sizes)], head i's outputs at offsets sum(sizes[:i]) onwards (parameters `head_<i>`).
  The two-stage classifier's `shared` network: a group head, then one head per group."""
  sizes: tuple[int, ...]
  init: str = "torch"

  @property
  def features(self) -> int:
    return sum(self.sizes)

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([Dense(n, init=self.init, name=f"head_{i}")(x)
                            for i, n in enumerate(self.sizes)], axis=-1)


def make_backbone(spec: ModelSpec, arch: str | None = None, width: int | None = None) -> nn.Module:
  """The backbone named by `arch` (default `spec.name`) with the spec's norm and conv impl."""
  arch = arch or spec.name
  width = width or spec.width
  impl, init = spec.conv_impl, spec.init
  if arch == "convnet":
    return ConvNet(depth=spec.depth, width=width, norm=spec.norm, conv_impl=impl,
                   init=init)
  if arch == "resnet18":
    return ResNet18(width=width, norm=spec.norm, conv_impl=impl, init=init)
  if arch == "vgg11":
    return VGG11(width=width, norm=spec.norm, conv_impl=impl, init=init)
  if arch == "alexnet":
    return AlexNet(width=width, conv_impl=impl, init=init)
  raise errors.InputError(f"Unknown architecture {arch!r}; accepted: {ARCHS}.")


def make_head(spec: ModelSpec, num_outputs: int) -> nn.Module:
  """A linear head with `num_outputs` outputs (classes, groups, or a group's classes)."""
  return Dense(num_outputs, init=spec.init)


def make_classifier(spec: ModelSpec, num_classes: int, arch: str | None = None,
                    width: int | None = None) -> Classifier:
  """Backbone plus a linear head with `num_classes` outputs."""
  return Classifier(make_backbone(spec, arch, width), make_head(spec, num_classes))


def with_stored_stats(model: Classifier) -> Classifier:
  """The same classifier (same parameters) with its batch norms normalising with the stored
  statistics of the `batch_stats` collection instead of each batch's own (ConvNet only)."""
  if not isinstance(model.backbone, ConvNet) or model.backbone.norm != "batch":
    raise errors.InputError("Stored batch-norm statistics need a ConvNet with model.norm='batch'.")
  return model.clone(backbone=model.backbone.clone(stored_stats=True))


def make_multi_head(spec: ModelSpec, sizes: tuple[int, ...]) -> MultiHead:
  """Linear heads of `sizes` outputs each on one backbone's features (`MultiHead`)."""
  return MultiHead(tuple(int(n) for n in sizes), init=spec.init)


def num_outputs(model) -> int:
  """The outputs of a classifier's linear head (all heads together for a `MultiHead`; a module
  that builds its head inside, e.g. the statistics-matching observer, says `num_classes`)."""
  head = getattr(model, "head", None)
  return head.features if head is not None else model.num_classes


def head_segments(model: Classifier) -> tuple[int, ...]:
  """The head sizes of a `MultiHead` classifier, () for one head: what its loss sums over
  (`training.TrainSpec.segments`)."""
  return tuple(model.head.sizes) if isinstance(model.head, MultiHead) else ()


def for_inference(model: Classifier) -> Classifier:
  """The same classifier (same parameters) with an `auto` convolution resolved for a forward pass
  only, which on CPU is XLA's own convolution rather than the im2col form training needs."""
  backbone = model.backbone
  if getattr(backbone, "conv_impl", None) == "auto":
    backbone = backbone.clone(conv_impl=resolve_conv_impl("auto", inference=True))
  return model.clone(backbone=backbone)


__all__ = ["ARCHS", "INITS", "AlexNet", "Classifier", "ConvNet", "Dense", "ModelSpec", "MultiHead",
           "ResNet18", "VGG11", "for_inference", "head_segments", "make_backbone",
           "make_classifier", "make_head", "make_multi_head", "num_outputs", "resolve_conv_impl",
           "with_stored_stats"]
