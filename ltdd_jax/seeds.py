"""The named random streams of a run: every draw derives from `config.seed` through one of these.

JAX streams are keys of `seed + offset`; numpy streams are `default_rng([seed, ..., tag])`. The
offsets and tags are the values every published number of this repository was made with, so they
are part of the results: changing one changes every figure downstream of it.
"""

from __future__ import annotations

import dataclasses

import jax

# JAX seed offsets.
EXPERT_DATA = 0                # experts: initialisation and batch order / augmentation
CLASSIFIER_EXPERT_DATA = 1     # LTDD's classifier-only experts: batch order / augmentation
EVALUATION_DATA = 7919         # evaluation networks: batch order / augmentation
WITHIN_GROUP_NETWORKS = 1      # + g: the seed of group g's within-group evaluation networks
OBSERVERS = 104729             # statistics matching: the observer and teacher networks
# numpy stream tags (the last entry of the generator's seed sequence).
RANDOM_SELECTION = 17          # `random` baseline and real-image initialisation: [seed, class, 17]
CORRECT_SELECTION = 29         # images the labelling experts classify correctly: [seed, class, 29]


def offset(seed: int, stream: int) -> int:
  """The seed of a named stream (`seed + stream`)."""
  return seed + stream


@dataclasses.dataclass(frozen=True)
class EpochKeys:
  """The keys an ensemble trains with: network n's epoch e (0-based) draws its batch order and
  augmentation from split(fold_in(key(seed), e + first_fold), T)[n], so an epoch's draws depend on
  (seed, e) alone and a resumed training is bitwise an uninterrupted one.

  Attributes:
    seed: the stream's seed (`offset(config.seed, stream)`).
    first_fold: what epoch 0 folds in: experts fold in the number of epochs done after the epoch
      (1 for the first), evaluation networks the epoch's index (0).
  """
  seed: int
  first_fold: int = 0

  def __call__(self, epoch: int, num_models: int) -> jax.Array:
    """[num_models] keys of epoch `epoch` (0-based)."""
    base = jax.random.key(self.seed)
    return jax.random.split(jax.random.fold_in(base, epoch + self.first_fold), num_models)
