"""Per-channel normalisation and ZCA whitening, fitted once on the long-tailed training set.

The same fitted `Preprocessor` maps every split (train, validation, test, synthetic evaluation) to
"model space" and back to pixel space for pictures, so train and test can never be preprocessed
differently (a bug seen in public long-tail code).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import tempfile
import zipfile

import numpy as np


@dataclasses.dataclass(frozen=True)
class Preprocessor:
  """A fitted pixel-space <-> model-space map.

  Attributes:
    mean: [C] per-channel mean subtracted before dividing by `std` (zeros when off).
    std: [C] per-channel std (ones when off).
    zca: [D, D] whitening matrix over flattened H*W*C (None when ZCA is off).
    zca_inverse: [D, D] its inverse.
    zca_centre: [D] per-pixel mean removed before whitening (kornia keeps it inside the transform).
  """
  mean: np.ndarray
  std: np.ndarray
  zca: np.ndarray | None = None
  zca_inverse: np.ndarray | None = None
  zca_centre: np.ndarray | None = None

  def apply(self, images: np.ndarray) -> np.ndarray:
    """Pixel space [N, H, W, C] in [0, 1] -> model space, float32."""
    x = (np.asarray(images, np.float32) - self.mean) / self.std
    if self.zca is not None:
      shape = x.shape
      x = ((x.reshape(shape[0], -1) - self.zca_centre) @ self.zca).reshape(shape)
    return x.astype(np.float32)

  def invert(self, images: np.ndarray) -> np.ndarray:
    """Model space [N, H, W, C] -> pixel space (not clipped), float32."""
    x = np.asarray(images, np.float32)
    if self.zca_inverse is not None:
      shape = x.shape
      x = (x.reshape(shape[0], -1) @ self.zca_inverse + self.zca_centre).reshape(shape)
    return (x * self.std + self.mean).astype(np.float32)

  def to_dict(self) -> dict[str, np.ndarray]:
    """The fitted arrays (what `Preprocessor(**d)` rebuilds it from)."""
    out = {"mean": self.mean, "std": self.std}
    if self.zca is not None:
      out.update(zca=self.zca, zca_inverse=self.zca_inverse, zca_centre=self.zca_centre)
    return out


def cached_fit(train_pixels_uint8: np.ndarray, cache_dir: str, *, normalize: bool, zca: bool,
               zca_eps: float) -> Preprocessor:
  """`fit_preprocessor` on train_pixels_uint8 / 255, cached under `cache_dir`.

  Fitting ZCA (a D x D eigendecomposition, D = H*W*C) takes tens of seconds for CIFAR; the fit
  depends only on the training images and the three settings, so it is stored keyed by a hash of
  those and reloaded in well under a second."""
  key = hashlib.sha256(np.ascontiguousarray(train_pixels_uint8).tobytes())
  key.update(repr((train_pixels_uint8.shape, bool(normalize), bool(zca), float(zca_eps))).encode())
  path = pathlib.Path(os.path.expanduser(cache_dir)) / f"preprocess-{key.hexdigest()[:20]}.npz"
  if path.exists():
    try:
      with np.load(path) as f:
        return Preprocessor(**{k: f[k] for k in f.files})
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
      pass  # A damaged cache entry is refitted and rewritten below.
  pre = fit_preprocessor(train_pixels_uint8.astype(np.float32) / 255.0, normalize=normalize,
                         zca=zca, zca_eps=zca_eps)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")  # concurrent runs never collide
  with os.fdopen(fd, "wb") as f:
    np.savez(f, **pre.to_dict())
  os.replace(tmp, path)
  return pre


def fit_preprocessor(train_images: np.ndarray, *, normalize: bool, zca: bool,
                     zca_eps: float) -> Preprocessor:
  """Fits normalisation (per channel) and optionally ZCA on training images in [0, 1].

  ZCA follows kornia's ZCAWhitening as used by MTT: covariance of the centred, flattened data,
  W = U diag(1 / sqrt(S + eps)) U^T, applied as (x - centre) @ W; `invert` undoes it exactly.

  Args:
    train_images: [N, H, W, C] float in [0, 1].
    normalize: subtract the per-channel mean and divide by the per-channel std.
    zca: fit ZCA whitening after (optional) normalisation.
    zca_eps: eigenvalue regulariser.

  Returns:
    A `Preprocessor`.
  """
  x = np.asarray(train_images, np.float64)
  channels = x.shape[-1]
  if normalize:
    mean = x.mean(axis=(0, 1, 2))
    std = x.std(axis=(0, 1, 2)) + 1e-8
  else:
    mean, std = np.zeros(channels), np.ones(channels)
  if not zca:
    return Preprocessor(mean.astype(np.float32), std.astype(np.float32))
  flat = ((x - mean) / std).reshape(len(x), -1)
  centre = flat.mean(axis=0)
  flat = flat - centre
  cov = flat.T @ flat / max(len(flat) - 1, 1)
  eigval, eigvec = np.linalg.eigh(cov)
  eigval = np.clip(eigval, 0.0, None)
  whiten = (eigvec * (1.0 / np.sqrt(eigval + zca_eps))) @ eigvec.T
  unwhiten = (eigvec * np.sqrt(eigval + zca_eps)) @ eigvec.T
  return Preprocessor(mean.astype(np.float32), std.astype(np.float32), whiten.astype(np.float32),
                      unwhiten.astype(np.float32), centre.astype(np.float32))
