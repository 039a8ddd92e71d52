"""The synthetic set: its initial state, its training targets, its learned lr and its file.

Initialisation (DESIGN §4): real images per class, or noise; with soft labels (datm, ltdd), images
the labelling experts classify correctly, labelled with those experts' mean logits (DATM's and
LTDD's selections differ, `LabelInitSpec`). The file `synthetic.npz` holds the model-space and
pixel-space images, labels, soft labels and lr, and is validated on load.
"""

from __future__ import annotations

import dataclasses
import pathlib
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from ltdd_jax import errors, matching, methods, models, reporting, selection
from ltdd_jax import evaluate as evaluate_lib
from ltdd_jax import experts as experts_lib



@dataclasses.dataclass(frozen=True)
class LabelInitSpec:
  """How DATM-style soft labels and their images are initialised from a labelling expert set.

  Attributes:
    search_experts: how many experts (in order) are searched for images they classify correctly,
      until a class has `ipc` of them (-1: all; DATM cycles through its experts, LTDD's stored
      code makes one pass with the first).
    duplicate: a class with fewer correctly classified images than `ipc` repeats them (LTDD's
      `duplicate`); otherwise it is filled with its other images.
    label_epoch: the experts' epoch whose logits are used (-1: the last).
  """
  search_experts: int = -1
  duplicate: bool = False
  label_epoch: int = -1


def label_init_spec(config) -> LabelInitSpec:
  """`config.datm` for datm, `config.ltdd` for ltdd (their published selections differ)."""
  method_config = config.ltdd if config.method.split("+")[0] == "ltdd" else config.datm
  return LabelInitSpec(search_experts=method_config.init_experts,
                       duplicate=method_config.duplicate,
                       label_epoch=config.datm.label_expert_epoch)


def expert_logits(protocol: evaluate_lib.Protocol, expert_set: experts_lib.ExpertSet,
                  images: np.ndarray, epoch: int = -1) -> np.ndarray:
  """[K, N, C] logits of every expert of a set at one epoch (-1: the last) on `images`, run as
  the evaluation protocol runs trained networks."""
  model = models.make_classifier(protocol.model, expert_set.num_classes)
  return protocol.logits(model, expert_set.at_epoch(epoch), images)


def expert_correct(protocol: evaluate_lib.Protocol, expert_set: experts_lib.ExpertSet, images: np.ndarray,
                   labels: np.ndarray, experts: int = -1, epoch: int = -1) -> np.ndarray:
  """[K', N] bool: expert k classifies image n correctly, for the first `experts` experts (-1:
  all), one expert at a time so that memory holds booleans, not [K, N, C] logits."""
  epoch = expert_set.epochs if epoch < 0 or epoch > expert_set.epochs else epoch
  count = expert_set.num_experts if experts < 0 else min(experts, expert_set.num_experts)
  model = models.make_classifier(protocol.model, expert_set.num_classes)
  rows = []
  for k in range(count):
    params = jax.tree.map(lambda x: x[None], expert_set.load_epoch(k, epoch))
    logits = protocol.logits(model, params, images)[0]
    rows.append(logits.argmax(-1) == labels)
  return np.stack(rows)


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
    rng = np.random.default_rng([seed, c, 29])
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


def initial_synthetic(config, data, expert_set: experts_lib.ExpertSet | None,
                      label_set: experts_lib.ExpertSet | None = None) -> tuple[dict, dict]:
  """Initial synthetic state: images [C*ipc, ...], log_lr, and label_logits when soft.

  Real init draws `ipc` training images per class (repeating the images of classes with fewer when
  `distill.allow_duplicates`). With soft labels (datm, ltdd) and `datm.correct_only`, images are
  chosen among those the labelling experts classify correctly (`select_correct`) and their label
  logits are the mean over the experts that do (`mean_correct_logits`). The labelling experts are
  `label_set` when given (LTDD: the class-balanced classifier experts) and `expert_set` otherwise.

  Returns:
    (state, record): record holds, per class, `init_label_acc` (share of its images whose initial
    label's argmax is the class), `init_expert_correct` (share whose labels come from experts that
    classify them correctly, the rest from the class-correct fallback) and `init_found` (correctly
    classified images found before any repetition or filling); empty for hard labels.
  """
  cfg = config.distill
  options = methods.method_options(config)
  protocol = evaluate_lib.Protocol.from_config(config)
  ipc, num_classes = cfg.ipc, data.num_classes
  selection.check_ipc(data.train_labels, num_classes, ipc, cfg.allow_duplicates)
  labels = np.repeat(np.arange(num_classes), ipc).astype(np.int32)
  found = None
  if options.soft_labels:
    source = label_set or expert_set
    if source is None:
      raise errors.InputError("Soft labels need an expert set to initialise them from.")
    spec = label_init_spec(config)
  if cfg.init == "real":
    if options.soft_labels and config.datm.correct_only:
      correct = expert_correct(protocol, source, data.train_images, data.train_labels,
                               spec.search_experts, spec.label_epoch)
      idx, found = select_correct(correct, data.train_labels, num_classes, ipc, spec, config.seed)
    else:
      idx = selection.random_selection(data.train_labels, num_classes, ipc, config.seed,
                                       cfg.allow_duplicates)
    images = data.train_images[idx].copy()
  elif cfg.init == "noise":
    images = np.random.default_rng(config.seed).normal(
        size=(num_classes * ipc, *data.image_shape)).astype(np.float32)
    idx = None
  else:
    raise errors.InputError(f"distill.init must be 'real' or 'noise', got {cfg.init!r}.")
  state = {"images": images.astype(np.float32),
           "log_lr": np.float32(np.log(cfg.syn_lr_init)), "labels": labels}
  if not options.soft_labels:
    return state, {}
  if idx is None:  # Noise images: an expert's logits on them mean nothing.
    label_logits = class_correct_logits(labels, num_classes)
    from_experts = np.zeros(len(labels), bool)
  else:  # Every labelling expert's logits, on the chosen images only.
    logits = expert_logits(protocol, source, data.train_images[idx], spec.label_epoch)
    label_logits, from_experts = mean_correct_logits(logits, labels)
  state["label_logits"] = label_logits
  per_class = lambda v: np.asarray([v[labels == c].mean() for c in range(num_classes)], np.float32)
  record = {"init_label_acc": per_class(label_logits.argmax(-1) == labels),
            "init_expert_correct": per_class(from_experts)}
  if found is not None:
    record["init_found"] = found
  return state, record


def targets_of(syn: dict) -> jax.Array:
  """Training targets of the synthetic set: soft probabilities or int labels."""
  if "label_logits" in syn:
    return matching.soft_targets(syn["label_logits"])
  return syn["labels"]


def synthetic_lr(syn: dict, evaluate_config) -> float:
  """The evaluation lr of a synthetic set: the learned one, or evaluate.lr when told not to use it.

  A set distilled with one lr per objective (hierarchical) and evaluated by one flat network gets
  their geometric mean; the two-stage classifier uses each network's own (`synthetic_lrs`)."""
  if not evaluate_config.use_learned_lr:
    return evaluate_config.lr
  return float(np.exp(np.mean(syn["log_lr"])))


def synthetic_lrs(syn: dict, evaluate_config) -> dict[str, float]:
  """Objective name -> learned lr of a set distilled with one lr per objective ({} otherwise, or
  when `evaluate.use_learned_lr` is off)."""
  if not evaluate_config.use_learned_lr or "lr_objectives" not in syn:
    return {}
  return {str(n): float(v) for n, v in zip(syn["lr_objectives"], np.exp(syn["log_lr"]))}


def save_synthetic(workdir, syn: dict, data, config, objective_names=(),
                   label_record: dict | None = None) -> pathlib.Path:
  """Writes `synthetic.npz` (model-space and pixel-space images, labels, soft labels, lr) and the
  PNG grid `synthetic.png`. With one lr per objective, `lr` is a vector and `lr_objectives` (from
  `objective_names`) names its entries; `label_record` (the soft labels' per-class initial record
  from `initial_synthetic`) is stored beside them."""
  workdir = pathlib.Path(workdir)
  pixels = data.preprocessor.invert(syn["images"])
  lr = np.exp(np.asarray(syn["log_lr"], np.float32))
  out = {"images": syn["images"], "pixels": pixels, "labels": syn["labels"], "lr": lr}
  if lr.ndim:
    if len(objective_names) != len(lr):
      raise errors.InputError(f"{len(lr)} learned lrs but objective names {list(objective_names)}.")
    out["lr_objectives"] = np.asarray(objective_names, dtype=str)
  if "label_logits" in syn:
    out["label_logits"] = syn["label_logits"]
    out["soft_labels"] = np.asarray(matching.soft_targets(jnp.asarray(syn["label_logits"])))
  out.update({k: np.asarray(v) for k, v in (label_record or {}).items()})
  path = workdir / "synthetic.npz"
  workdir.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(path, **out)
  lo, hi = np.percentile(pixels, [1, 99])
  reporting.image_grid((pixels - lo) / max(hi - lo, 1e-6), syn["labels"], workdir / "synthetic.png",
                       per_class=min(config.distill.ipc, 10),
                       title=f"{config.method} synthetic set, IPC {config.distill.ipc}")
  return path


def load_synthetic(path, num_classes: int | None = None,
                   image_shape: tuple[int, ...] | None = None) -> dict:
  """Reads `synthetic.npz` back: images (model space), labels, lr and soft labels if present.

  Validates what evaluation relies on, so a wrong or damaged file fails here with its path: the
  keys `images`, `labels`, `lr`; as many labels (and soft labels) as images; labels in
  [0, num_classes) and images of `image_shape` when given; finite positive lrs."""
  path = pathlib.Path(path)
  if not path.exists():
    raise errors.MissingError(f"No synthetic set at {path}; run distillation first "
                              "(python -m launch.distill ...).")
  try:
    with np.load(path) as f:
      out = {k: f[k] for k in f.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise errors.InputError(f"{path} is not a readable synthetic set ({type(e).__name__}: {e}); it "
                            "is empty or truncated: distil it again or point at another file.") from e
  bad = lambda why: errors.InputError(f"{path}: {why}.")
  missing = [k for k in ("images", "labels", "lr") if k not in out]
  if missing:
    raise bad(f"missing {', '.join(missing)} (a synthetic set has images, labels and lr)")
  images, labels, lr = out["images"], out["labels"], np.asarray(out["lr"])
  if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels):
    raise bad(f"{images.shape} images but {labels.shape} labels; expected [N, H, W, C] and [N]")
  if "soft_labels" in out and out["soft_labels"].shape[0] != len(images):
    raise bad(f"{out['soft_labels'].shape[0]} soft labels for {len(images)} images")
  if not np.issubdtype(labels.dtype, np.integer) or (
      len(labels) and (labels.min() < 0 or (num_classes is not None and labels.max() >= num_classes))):
    raise bad(f"labels must be integers in [0, {num_classes}), got {labels.dtype} in "
              f"[{labels.min() if len(labels) else '-'}, {labels.max() if len(labels) else '-'}]")
  if image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
    raise bad(f"images are {images.shape[1:]} but the dataset's are {tuple(image_shape)}; "
              "evaluate with the config it was distilled with")
  if not (np.isfinite(lr).all() and (lr > 0).all()):
    raise bad(f"learning rate {lr} must be finite and > 0")
  if not np.isfinite(images).all():
    raise bad("images contain NaN or Inf")
  out["log_lr"] = np.log(lr)
  return out
