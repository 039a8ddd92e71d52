"""What a user checks first: the LT class counts, split sizes and what the images look like."""

from __future__ import annotations

import pathlib

import numpy as np

from ltdd_jax import reporting
from ltdd_jax.data import dataset as dataset_lib
from ltdd_jax.run import pipeline


def summary(data: dataset_lib.Dataset) -> dict:
  """Class counts and split sizes as a dict."""
  return {
      "dataset": data.name,
      "num_classes": data.num_classes,
      "image_shape": list(data.image_shape),
      "train_counts": data.counts.tolist(),
      "train_size": int(data.counts.sum()),
      "imbalance_ratio": float(data.counts.max() / data.counts.min()),
      "validation_size": len(data.val_labels),
      "test_size": len(data.test_labels),
  }


def inspect_data(config, workdir: str) -> str:
  """Loads the configured dataset, writes `data_summary.json` and `data_grid.png`; returns a table."""
  data = pipeline.load_dataset(config)
  info = summary(data)
  out = pathlib.Path(workdir)
  reporting.write_json(out / "data_summary.json", info)
  rng = np.random.default_rng(config.seed)
  picks = np.concatenate([
      rng.permutation(np.flatnonzero(data.train_labels == c))[:8] for c in range(data.num_classes)])
  reporting.image_grid(data.preprocessor.invert(data.train_images[picks]), data.train_labels[picks],
                       out / "data_grid.png", per_class=8, title=f"{data.name} LT training images")
  lines = [f"dataset {data.name}: {data.num_classes} classes, images {data.image_shape}",
           f"train {info['train_size']} (imbalance {info['imbalance_ratio']:.1f}), "
           f"validation {info['validation_size']}, test {info['test_size']}",
           "class  name            train"]
  lines += [f"{c:5d}  {data.class_names[c][:14]:14s}  {n:5d}" for c, n in enumerate(data.counts)]
  lines.append(f"wrote {out / 'data_summary.json'} and {out / 'data_grid.png'}")
  return "\n".join(lines)
