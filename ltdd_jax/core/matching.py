"""Trajectory matching (DESIGN §4): the MTT loss and its DATM / LTDD options, as pure functions.

A student starts at an expert's parameters theta_s, takes N SGD steps on synthetic minibatches (DSA
on, learnable lr), and is compared with the expert M epochs later:
    loss = ||theta_N - theta_{s+M}||^2 / ||theta_s - theta_{s+M}||^2.
The inner loop is a `lax.scan` whose body is `jax.checkpoint`-ed, so reverse-mode memory is roughly
constant in N (recomputation instead of storing every step's activations).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ltdd_jax import errors, parallel
from ltdd_jax.core import augment, training

PyTree = Any
REMAT_POLICIES = ("nothing_saveable", "everything_saveable", "dots_saveable",
                  "dots_with_no_batch_dims_saveable")
TRAIN_PARTS = ("all", "head")


@dataclasses.dataclass(frozen=True)
class InnerSpec:
  """Static description of the student's unrolled training (hashable, closed over by jit).

  Attributes:
    syn_steps: N inner SGD steps.
    batch_syn: synthetic images per inner step.
    remat: wrap the scan body in `jax.checkpoint`.
    remat_policy: a `jax.checkpoint_policies` name.
    train_part: which parameters the student's SGD updates: `all`, or `head` (LTDD's classifier
      stage: the backbone stays at the expert's, bit for bit).
    weight_reduction: how class-weighted inner losses are reduced (`training.cross_entropy`).
    augment: DSA on every inner minibatch (`distill.dsa`; None: no augmentation).
  """
  syn_steps: int
  batch_syn: int
  remat: bool = True
  remat_policy: str = "nothing_saveable"
  train_part: str = "all"
  weight_reduction: str = "batch"
  augment: augment.DSASpec | None = None

  def __post_init__(self):
    if self.remat_policy not in REMAT_POLICIES:
      raise errors.InputError(f"Unknown distill.remat_policy {self.remat_policy!r}; accepted: "
                       f"{REMAT_POLICIES}.")
    if self.train_part not in TRAIN_PARTS:
      raise errors.InputError(f"Unknown train_part {self.train_part!r}; accepted: {TRAIN_PARTS}.")
    if self.weight_reduction not in training.WEIGHT_REDUCTIONS:
      raise errors.InputError(f"Unknown ltdd.dam_reduction {self.weight_reduction!r}; accepted: "
                       f"{training.WEIGHT_REDUCTIONS}.")


def minibatch_indices(key: jax.Array, num_images: int, spec: InnerSpec) -> jax.Array:
  """[syn_steps, batch_syn] indices: consecutive chunks of fresh random permutations (as MTT)."""
  batch = min(spec.batch_syn, num_images)
  per_perm = num_images // batch
  perms = -(-spec.syn_steps // per_perm)
  keys = jax.random.split(key, perms)
  order = jax.vmap(lambda k: jax.random.permutation(k, num_images)[:per_perm * batch])(keys)
  return order.reshape(-1, batch)[:spec.syn_steps]


@dataclasses.dataclass(frozen=True, eq=False)
class Student:
  """The network a synthetic set trains inside the meta-gradient.

  Attributes:
    apply_fn: (params, images) -> logits.
    spec: its `InnerSpec`.
    class_weights: optional [C] inner-loss class weights (LTDD's DAM).
    mesh: when given, each minibatch is sharded over the mesh's `data` axis.
  """
  apply_fn: Any
  spec: InnerSpec
  class_weights: Any = None
  mesh: Any = None


def unroll_student(student: Student, start_params: PyTree, syn: dict, key: jax.Array) -> PyTree:
  """Trains a student from `start_params` for `spec.syn_steps` plain SGD steps on synthetic data.

  Args:
    student: the `Student` (network, inner spec, DAM weights, mesh).
    start_params: expert parameters at the start epoch.
    syn: {images [N, H, W, C], targets [N] int labels or [N, C] probabilities, lr (scalar)}: what
      the meta-gradient differentiates.
    key: PRNG key (minibatch order and DSA).

  Returns:
    The student's parameters after the last step, differentiable w.r.t. every entry of `syn`.
  """
  spec, apply_fn, class_weights = student.spec, student.apply_fn, student.class_weights
  images, targets, syn_lr = jnp.asarray(syn["images"]), jnp.asarray(syn["targets"]), syn["lr"]
  order_key, aug_key = jax.random.split(key)
  batches = minibatch_indices(order_key, images.shape[0], spec)
  aug_keys = jax.random.split(aug_key, spec.syn_steps)

  def step(params, inputs):
    idx, k = inputs
    x = parallel.constrain_leading(images[idx], student.mesh)
    if spec.augment is not None:
      x = augment.augment(k, x, spec.augment)
    loss = lambda p: training.cross_entropy(apply_fn(p, x), targets[idx], class_weights,
                                            spec.weight_reduction)
    sgd = lambda p, g: jax.tree.map(lambda a, b: a - syn_lr * b, p, g)
    if spec.train_part == "head":  # The backbone is a constant: no update, no gradient.
      head = params["head"]
      head_grads = jax.grad(lambda h: loss({**params, "head": h}))(head)
      return {**params, "head": sgd(head, head_grads)}, None
    return sgd(params, jax.grad(loss)(params)), None

  if spec.remat:
    step = jax.checkpoint(step, policy=getattr(jax.checkpoint_policies, spec.remat_policy))
  final, _ = jax.lax.scan(step, start_params, (batches, aug_keys))
  return final


def leaf_mask(params: PyTree, part: str) -> PyTree:
  """Per-leaf booleans selecting `all`, `backbone` or `head` parameters of a Classifier pytree."""
  if part == "all":
    return jax.tree.map(lambda _: True, params)
  if part not in ("backbone", "head"):
    raise errors.InputError(f"part must be 'all', 'backbone' or 'head', got {part!r}.")
  return {k: jax.tree.map(lambda _, keep=(k == part): keep, v) for k, v in params.items()}


def normalized_distance(final: PyTree, start: PyTree, target: PyTree,
                        part: str = "all") -> jax.Array:
  """||final - target||^2 / ||start - target||^2 over the leaves of `part`."""
  mask = jax.tree.leaves(leaf_mask(target, part))
  sq = lambda a, b: [jnp.sum(jnp.square(x - y)) for x, y in zip(jax.tree.leaves(a),
                                                                 jax.tree.leaves(b))]
  num = sum(d for d, m in zip(sq(final, target), mask) if m)
  den = sum(d for d, m in zip(sq(start, target), mask) if m)
  return num / den


def trajectory_matching_loss(student: Student, syn: dict, pair: dict, key: jax.Array,
                             part: str = "all") -> jax.Array:
  """The MTT loss for one pair of expert parameters ({start, target}: theta_s, theta_{s+M}) over
  the leaves of `part` (`all`, `backbone` or `head`). Scalar; `syn` as `unroll_student` takes it."""
  final = unroll_student(student, pair["start"], syn, key)
  return normalized_distance(final, pair["start"], pair["target"], part)


def class_frequency_weights(counts: np.ndarray) -> np.ndarray:
  """LTDD's DAM weights: the long-tailed class frequencies n_c / N (summing to 1). [C] float32."""
  counts = np.asarray(counts, np.float64)
  return (counts / counts.sum()).astype(np.float32)


def sampled_class_counts(counts: np.ndarray, sampling: str,
                         classes_per_output: np.ndarray | None = None) -> np.ndarray:
  """How often the experts' SGD drew each output (up to scale), the distribution DAM mimics.

  DAM weights the student's inner loss so that a class-balanced synthetic set moves the student
  as the experts' data moved them. Experts that sample by instance saw the dataset's counts;
  class-balanced experts (the hierarchical stage-1 group experts by default) saw every output
  equally often, so their objective's DAM weights are uniform, not the 80:1 group counts of
  CIFAR-10-LT IF 100; `by_class` group experts drew every class equally often, so each group in
  proportion to `classes_per_output` ([outputs] classes behind each output)."""
  counts = np.asarray(counts, np.float64)
  if sampling == "instance":
    return counts
  if sampling == "class_balanced":
    return np.ones_like(counts)
  if sampling == "by_class":
    if classes_per_output is None:
      raise errors.InputError("by_class sampling needs the number of classes behind each output.")
    return np.asarray(classes_per_output, np.float64)
  raise errors.InputError(f"Unknown expert sampling {sampling!r}; accepted: instance, "
                          "class_balanced, by_class.")


def soft_targets(label_logits: jax.Array) -> jax.Array:
  """Learnable label logits [N, C] -> target probabilities (DATM)."""
  return jax.nn.softmax(label_logits, axis=-1)
