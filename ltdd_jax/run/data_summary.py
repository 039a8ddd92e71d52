"""What a user checks first: the LT class counts, split sizes and what the images look like."""

from __future__ import annotations

import pathlib

import numpy as np

from ltdd_jax import reporting
from ltdd_jax.data import dataset as dataset_lib
from ltdd_jax.run import checks, pipeline, specs


def summary(data: dataset_lib.Dataset, spec: dataset_lib.DataSpec) -> dict:
  """Class counts, split sizes and where the images come from, as a dict."""
  return {
      "dataset": data.name,
      "train_source": spec.train_source,
      "train_path": spec.train_path,
      "test_source": spec.test_source,
      "image_size": spec.image_size,
      "resize": spec.resize,
      "resized_images": data.resized,
      "class_names": list(data.class_names),
      "num_classes": data.num_classes,
      "image_shape": list(data.image_shape),
      "image_formats": list(data.image_formats),
      "train_counts": data.counts.tolist(),
      "target_counts": None if data.target_counts is None else data.target_counts.tolist(),
      "train_size": int(data.counts.sum()),
      "imbalance_ratio": float(data.counts.max() / data.counts.min()),
      "validation_size": len(data.val_labels),
      "test_size": len(data.test_labels),
  }


FORMATS = {".jpg": "JPEG (lossy)", ".jpeg": "JPEG (lossy)", ".png": "PNG (lossless)",
           ".bmp": "BMP (lossless)"}


def describe_format(suffix: str) -> str:
  """`.jpg` -> `.jpg: JPEG (lossy)`: whether the copy read is lossless."""
  return f"{suffix}: {FORMATS.get(suffix, 'unknown')}"


def inspect_data(config, workdir: str) -> str:
  """Loads the configured dataset, writes `data_summary.json` and `data_grid.png`; returns a table.
  A long-tailed subset that leaves a class without images fails as a run would."""
  data = pipeline.load_dataset(config)
  checks.check_counts(config, data)
  spec = specs.data(config)
  info = summary(data, spec)
  out = pathlib.Path(workdir)
  reporting.write_json(out / "data_summary.json", info)
  rng = np.random.default_rng(config.seed)
  picks = np.concatenate([
      rng.permutation(np.flatnonzero(data.train_labels == c))[:8] for c in range(data.num_classes)])
  row_names = [f"{c} {data.class_names[c]} ({int(n)})" for c, n in enumerate(data.counts)]
  reporting.image_grid(data.preprocessor.invert(data.train_images[picks]), data.train_labels[picks],
                       out / "data_grid.png", per_class=8,
                       title=f"{data.name} LT training images (class, name, training images)",
                       row_names=row_names)
  where = f" {spec.train_path}" if spec.train_path else ""
  test_where = f" {spec.test_path}" if spec.test_path and spec.test_source != "digits" else ""
  lines = [f"dataset {data.name}: {data.num_classes} classes, images {data.image_shape}",
           f"source {spec.train_source}{where} (test: {spec.test_source}{test_where}); images of another "
           f"size are resized by {spec.resize!r} ({data.resized} were)",
           f"image files {', '.join(describe_format(f) for f in data.image_formats) or '-'}",
           f"train {info['train_size']} (imbalance {info['imbalance_ratio']:.1f}), "
           f"validation {info['validation_size']}, test {info['test_size']}"]
  target = data.target_counts
  differs = target is not None and not np.array_equal(target, data.counts)
  lines.append("class  name            train" + ("  published" if differs else ""))
  lines += [f"{c:5d}  {data.class_names[c][:14]:14s}  {n:5d}"
            + (f"  {int(target[c]):7d}" if differs else "") for c, n in enumerate(data.counts)]
  if differs:
    lines.append(f"{int((target != data.counts).sum())} class(es) below the long-tail profile's "
                 "count: the validation split took their images (data.validation_from)")
  lines.append(f"wrote {out / 'data_summary.json'} and {out / 'data_grid.png'}")
  return "\n".join(lines)
