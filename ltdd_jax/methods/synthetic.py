"""The synthetic set: its initial state, its training targets, its learned lr and its file.

Initialisation (DESIGN §4): real images per class, or noise; with soft labels (datm, ltdd), images
the labelling experts classify correctly, labelled with those experts' mean logits (DATM's and
LTDD's selections differ, `LabelInitSpec`). A finished distillation is a `DistilledSet`: what
`synthetic.npz` holds (model-space and pixel-space images, labels, soft labels, lr), validated on
load, and what evaluation consumes in memory within one run.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from ltdd_jax import errors, reporting, seeds
from ltdd_jax.core import matching
from ltdd_jax.evaluation import protocol as protocol_lib
from ltdd_jax.methods import experts as experts_lib
from ltdd_jax.methods import selection


@dataclasses.dataclass(frozen=True)
class LabelInitSpec:
  """How DATM-style soft labels and their images are initialised from a labelling expert set.

  Attributes:
    correct_only: real images are chosen among those the labelling experts classify correctly.
    search_experts: how many experts (in order) are searched for images they classify correctly,
      until a class has `ipc` of them (-1: all; DATM cycles through its experts, LTDD's stored
      code makes one pass with the first).
    duplicate: a class with fewer correctly classified images than `ipc` repeats them (LTDD's
      `duplicate`); otherwise it is filled with its other images.
    label_epoch: the experts' epoch whose logits are used (-1: the last).
  """
  correct_only: bool = True
  search_experts: int = -1
  duplicate: bool = False
  label_epoch: int = -1


@dataclasses.dataclass(frozen=True)
class InitSpec:
  """How the synthetic set starts (`config.distill`, and the method's soft-label init).

  Attributes:
    ipc: images per class.
    init: `real` (training images) or `noise`.
    syn_lr: the student's initial lr.
    allow_duplicates: classes with fewer than ipc images repeat them.
    seed: which images are drawn.
    labels: how soft labels start (None: hard labels).
    batch_size: images per expert forward pass.
  """
  ipc: int
  init: str = "real"
  syn_lr: float = 0.01
  allow_duplicates: bool = True
  seed: int = 0
  labels: LabelInitSpec | None = None
  batch_size: int = 1000


def expert_correct(expert_set: experts_lib.ExpertSet, images: np.ndarray, labels: np.ndarray,
                   experts: int = -1, epoch: int = -1, batch_size: int = 1000) -> np.ndarray:
  """[K', N] bool: expert k classifies image n correctly, for the first `experts` experts (-1:
  all), one expert at a time so that memory holds booleans, not [K, N, C] logits."""
  count = expert_set.num_experts if experts < 0 else min(experts, expert_set.num_experts)
  return np.stack([expert_set.logits(images, epoch, (k,), batch_size)[0].argmax(-1) == labels
                   for k in range(count)])


def select_correct(correct: np.ndarray, labels: np.ndarray, num_classes: int, ipc: int,
                   spec: LabelInitSpec, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """DATM's `samples_predicted_correctly` image selection.

  For each class, its images in a seeded random order are taken when the first expert classifies
  them correctly, then the second's, ... (`spec.search_experts`), without repeats, until `ipc`.
  A class left short repeats what it found (`spec.duplicate`) or is filled with its other images;
  a class with no correctly classified image at all takes random images of its own.

  Args:
    correct: [K, N] bool, expert k classifies training image n correctly.
    labels: [N] training labels.

  Returns:
    (indices [C * ipc], found [C]: correctly classified images found per class, before filling).
  """
  searched = correct if spec.search_experts < 0 else correct[:spec.search_experts]
  idx, found = [], np.zeros(num_classes, np.int64)
  for c in range(num_classes):
    rng = np.random.default_rng([seed, c, seeds.CORRECT_SELECTION])
    members = rng.permutation(np.flatnonzero(labels == c))
    chosen = []
    for expert_correct in searched:
      chosen += [i for i in members[expert_correct[members]] if i not in chosen][:ipc - len(chosen)]
      if len(chosen) == ipc:
        break
    found[c] = len(chosen)
    rest = [i for i in members if i not in chosen]
    if len(chosen) < ipc and chosen and (spec.duplicate or not rest):
      chosen = list(np.resize(chosen, ipc))
    elif len(chosen) < ipc:
      chosen += list(rng.choice(rest, ipc - len(chosen), replace=len(rest) < ipc - len(chosen)))
    idx.append(np.asarray(chosen, np.int64))
  return np.concatenate(idx), found


def class_correct_logits(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Label logits that put 0.9 of the mass on each image's own class (a class-correct start)."""
  probs = np.where(np.eye(num_classes)[labels] > 0, 0.9, 0.1 / max(num_classes - 1, 1))
  return np.log(probs).astype(np.float32)


def mean_correct_logits(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """DATM's / LTDD's initial label logits: per image, the mean logits of the experts that classify
  it correctly (whose argmax is then its class); images no expert gets right fall back to
  `class_correct_logits`.

  Args:
    logits: [K, N, C] experts' logits on the N chosen images.
    labels: [N] their classes.

  Returns:
    (label logits [N, C], from_experts [N] bool).
  """
  correct = logits.argmax(-1) == labels[None]  # [K, N]
  count = correct.sum(0)
  mean = (logits * correct[..., None]).sum(0) / np.maximum(count, 1)[:, None]
  fallback = class_correct_logits(labels, logits.shape[-1])
  return np.where((count > 0)[:, None], mean, fallback).astype(np.float32), count > 0


def initial_synthetic(spec: InitSpec, data, expert_set: experts_lib.ExpertSet | None,
                      label_set: experts_lib.ExpertSet | None = None) -> tuple[dict, dict]:
  """Initial synthetic state: images [C*ipc, ...], log_lr, and label_logits when soft.

  Real init draws `ipc` training images per class (repeating the images of classes with fewer when
  `allow_duplicates`). With soft labels (datm, ltdd) and `correct_only`, images are chosen among
  those the labelling experts classify correctly (`select_correct`) and their label logits are the
  mean over the experts that do (`mean_correct_logits`). The labelling experts are `label_set`
  when given (LTDD: the class-balanced classifier experts) and `expert_set` otherwise.

  Returns:
    (state, record): record holds, per class, `init_label_acc` (share of its images whose initial
    label's argmax is the class), `init_expert_correct` (share whose labels come from experts that
    classify them correctly, the rest from the class-correct fallback) and `init_found` (correctly
    classified images found before any repetition or filling); empty for hard labels.
  """
  ipc, num_classes, soft = spec.ipc, data.num_classes, spec.labels
  selection.check_ipc(data.train_labels, num_classes, ipc, spec.allow_duplicates)
  labels = np.repeat(np.arange(num_classes), ipc).astype(np.int32)
  found = None
  if soft is not None:
    source = label_set or expert_set
    if source is None:
      raise errors.InputError("Soft labels need an expert set to initialise them from.")
  if spec.init == "real":
    if soft is not None and soft.correct_only:
      correct = expert_correct(source, data.train_images, data.train_labels, soft.search_experts,
                               soft.label_epoch, spec.batch_size)
      idx, found = select_correct(correct, data.train_labels, num_classes, ipc, soft, spec.seed)
    else:
      idx = selection.random_selection(data.train_labels, num_classes, ipc, spec.seed,
                                       spec.allow_duplicates)
    images = data.train_images[idx].copy()
  elif spec.init == "noise":
    images = np.random.default_rng(spec.seed).normal(
        size=(num_classes * ipc, *data.image_shape)).astype(np.float32)
    idx = None
  else:
    raise errors.InputError(f"distill.init must be 'real' or 'noise', got {spec.init!r}.")
  state = {"images": images.astype(np.float32),
           "log_lr": np.float32(np.log(spec.syn_lr)), "labels": labels}
  if soft is None:
    return state, {}
  if idx is None:  # Noise images: an expert's logits on them mean nothing.
    label_logits = class_correct_logits(labels, num_classes)
    from_experts = np.zeros(len(labels), bool)
  else:  # Every labelling expert's logits, on the chosen images only.
    logits = source.logits(data.train_images[idx], soft.label_epoch, batch_size=spec.batch_size)
    label_logits, from_experts = mean_correct_logits(logits, labels)
  state["label_logits"] = label_logits
  per_class = lambda v: np.asarray([v[labels == c].mean() for c in range(num_classes)], np.float32)
  record = {"init_label_acc": per_class(label_logits.argmax(-1) == labels),
            "init_expert_correct": per_class(from_experts)}
  if found is not None:
    record["init_found"] = found
  return state, record


def targets_of(syn: dict) -> jax.Array:
  """Training targets of the synthetic state: soft probabilities or int labels."""
  if "label_logits" in syn:
    return matching.soft_targets(syn["label_logits"])
  return syn["labels"]


@dataclasses.dataclass(frozen=True, eq=False)
class DistilledSet:
  """A finished synthetic set, as `synthetic.npz` holds it.

  Attributes:
    images: [N, H, W, C] float32 model-space images.
    labels: [N] int32 the class each image stands for.
    lr: [] or [O] float32 learned lr(s): one per objective for a set distilled against several.
    lr_objectives: O objective names of a vector `lr` (() for one lr).
    label_logits: [N, C] learned label logits (soft-label methods), or None.
    soft_labels: [N, C] their softmax, the networks' targets, or None.
    label_record: the soft labels' per-class initial record (`initial_synthetic`).
    rectified_labels: [N, C] the soft labels rectified (`+rectify`), then the networks' targets
      (the unrectified ones stay beside them), or None.
    rectify_record: how they were rectified (`rectify.Rectification.record`).
  """
  images: np.ndarray
  labels: np.ndarray
  lr: np.ndarray
  lr_objectives: tuple[str, ...] = ()
  label_logits: np.ndarray | None = None
  soft_labels: np.ndarray | None = None
  label_record: dict = dataclasses.field(default_factory=dict)
  rectified_labels: np.ndarray | None = None
  rectify_record: dict = dataclasses.field(default_factory=dict)

  @classmethod
  def from_state(cls, state: dict, objective_names=(),
                 label_record: dict | None = None) -> "DistilledSet":
    """The set of a distillation's final state (`run_distillation`); `objective_names` name the
    entries of a vector lr."""
    lr = np.exp(np.asarray(state["log_lr"], np.float32))
    if lr.ndim and len(objective_names) != len(lr):
      raise errors.InputError(f"{len(lr)} learned lrs but objective names {list(objective_names)}.")
    logits = state.get("label_logits")
    soft = None
    if logits is not None:
      logits = np.asarray(logits)
      soft = np.asarray(matching.soft_targets(jnp.asarray(logits)))
    return cls(np.asarray(state["images"]), np.asarray(state["labels"]), lr,
               tuple(objective_names) if lr.ndim else (), logits, soft,
               {k: np.asarray(v) for k, v in (label_record or {}).items()})

  def targets(self) -> np.ndarray:
    """What evaluation networks fit: the rectified soft labels, the soft labels, or the labels."""
    if self.rectified_labels is not None:
      return self.rectified_labels
    return self.labels if self.soft_labels is None else self.soft_labels

  def with_rectified(self, labels: np.ndarray | None, record: dict) -> "DistilledSet":
    """The set with rectified soft labels (None: without, its learned soft labels the targets)."""
    return dataclasses.replace(self, rectified_labels=labels,
                               rectify_record=dict(record) if labels is not None else {})

  def labelled(self, method: str, epochs: int, num_classes: int,
               fixed_lr: float | None = None) -> protocol_lib.LabelledSet:
    """The set as evaluation consumes it: soft labels as targets when it has them, its learned lr
    (the geometric mean of a vector lr for one flat network, each objective's own for the
    two-stage classifier's networks), or `fixed_lr` for every network when given."""
    log_lr = np.log(self.lr)  # The lrs as exp(log(lr)): the float32 rounding every result used.
    if fixed_lr is None:
      lr = float(np.exp(np.mean(log_lr)))
      learned = ({str(n): float(v) for n, v in zip(self.lr_objectives, np.exp(log_lr))}
                 if self.lr.ndim else {})
    else:
      lr, learned = fixed_lr, {}
    return protocol_lib.LabelledSet(self.images, self.labels, self.targets(), lr, epochs,
                                    int(len(self.images) // num_classes), method, learned)

  def save(self, workdir, preprocessor, title: str, per_class: int) -> pathlib.Path:
    """Writes `synthetic.npz` (model-space and pixel-space images, labels, soft labels, lr,
    `lr_objectives` naming a vector lr, the label record) and the PNG grid `synthetic.png`."""
    workdir = pathlib.Path(workdir)
    pixels = preprocessor.invert(self.images)
    out = {"images": self.images, "pixels": pixels, "labels": self.labels, "lr": self.lr}
    if self.lr.ndim:
      out["lr_objectives"] = np.asarray(self.lr_objectives, dtype=str)
    if self.label_logits is not None:
      out["label_logits"] = self.label_logits
      out["soft_labels"] = self.soft_labels
    if self.rectified_labels is not None:
      out["rectified_soft_labels"] = self.rectified_labels
      out["rectify_record"] = np.asarray(json.dumps(self.rectify_record))
    out.update(self.label_record)
    path = workdir / "synthetic.npz"
    workdir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **out)
    lo, hi = np.percentile(pixels, [1, 99])
    reporting.image_grid((pixels - lo) / max(hi - lo, 1e-6), self.labels,
                         workdir / "synthetic.png", per_class=per_class, title=title)
    return path

  @classmethod
  def load(cls, path, num_classes: int | None = None,
           image_shape: tuple[int, ...] | None = None) -> "DistilledSet":
    """Reads `synthetic.npz` back, validating what evaluation relies on, so a wrong or damaged
    file fails here with its path: the keys `images`, `labels`, `lr`; as many labels (and soft
    labels) as images; labels in [0, num_classes) and images of `image_shape` when given; finite
    positive lrs."""
    out = _read_npz(path)
    bad = lambda why: errors.InputError(f"{path}: {why}.")
    missing = [k for k in ("images", "labels", "lr") if k not in out]
    if missing:
      raise bad(f"missing {', '.join(missing)} (a synthetic set has images, labels and lr)")
    images, labels, lr = out["images"], out["labels"], np.asarray(out["lr"])
    if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels):
      raise bad(f"{images.shape} images but {labels.shape} labels; expected [N, H, W, C] and [N]")
    for key in ("soft_labels", "rectified_soft_labels"):
      if key in out and out[key].shape[0] != len(images):
        raise bad(f"{out[key].shape[0]} {key.replace('_', ' ')} for {len(images)} images")
    if not np.issubdtype(labels.dtype, np.integer):
      raise bad(f"labels must be integers in [0, {num_classes}), got an array of {labels.dtype}")
    if len(labels) and (labels.min() < 0 or (num_classes is not None
                                             and labels.max() >= num_classes)):
      raise bad(f"labels must be integers in [0, {num_classes}), got {labels.dtype} in "
                f"[{labels.min()}, {labels.max()}]")
    for key in ("images", "lr", "soft_labels", "label_logits", "rectified_soft_labels"):
      if key in out and not np.issubdtype(out[key].dtype, np.floating):
        raise bad(f"{key} must be floating point, got an array of {out[key].dtype}")
    if image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
      raise bad(f"images are {images.shape[1:]} but the dataset's are {tuple(image_shape)}; "
                "evaluate with the config it was distilled with")
    if not (np.isfinite(lr).all() and (lr > 0).all()):
      raise bad(f"learning rate {lr} must be finite and > 0")
    if not np.isfinite(images).all():
      raise bad("images contain NaN or Inf")
    names = tuple(str(n) for n in out.get("lr_objectives", ()))
    record = {k: v for k, v in out.items() if k.startswith("init_")}
    rectify_record = {}
    if "rectified_soft_labels" in out:
      try:
        rectify_record = json.loads(str(out["rectify_record"]))
      except (KeyError, ValueError) as e:
        raise bad("rectified_soft_labels without a readable rectify_record") from e
    return cls(images, labels, lr, names, out.get("label_logits"), out.get("soft_labels"), record,
               out.get("rectified_soft_labels"), rectify_record)


def _read_npz(path) -> dict:
  """Every array of an .npz file, with errors that name the file."""
  path = pathlib.Path(path)
  if not path.exists():
    raise errors.MissingError(f"No synthetic set at {path}; run distillation first "
                              "(python -m launch.distill ...).")
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except ValueError as e:
    if "allow_pickle" in str(e):
      raise errors.InputError(f"{path} holds arrays of Python objects; a synthetic set holds "
                              "numbers only (float images, int labels): write it again.") from e
    raise errors.InputError(f"{path} is not a readable synthetic set (ValueError: {e}); it is "
                            "empty or truncated: distil it again or point at another file.") from e
  except (OSError, EOFError, zipfile.BadZipFile) as e:
    raise errors.InputError(f"{path} is not a readable synthetic set ({type(e).__name__}: {e}); it "
                            "is empty or truncated: distil it again or point at another file.") from e
