"""Differentiable siamese augmentation (DSA, Zhao & Bilen 2021) in pure JAX.

Every transform is linear in the images, so gradients flow to synthetic pixels. With `siamese`, one
parameter draw is shared by the whole batch (what DSA does to real and synthetic batches so that they
see the same augmentation); otherwise each image draws its own. With mode `single` one transform
family is picked per call (DSA's default 'S' mode); with `all` every family in the strategy is
applied in order.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ltdd_jax import errors

FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")
MODES = ("single", "all")


@dataclasses.dataclass(frozen=True)
class DSASpec:
  """How DSA augments (`config.dsa`); whether a stage augments at all is that stage's own switch.

  Attributes:
    strategy: families joined by `_`, e.g. `color_crop_cutout_flip_scale_rotate`.
    mode: `single` (one family per call, DSA's 'S') or `all` (every family in order).
    siamese: one parameter draw shared by the whole batch.
    brightness, saturation, contrast: colour ranges.
    crop_pad: translation as a fraction of the size.
    cutout: side of the zeroed square as a fraction of the size.
    scale: anisotropic scaling in [1/scale, scale].
    rotate: rotation in +-rotate degrees.
  """
  strategy: str = "color_crop_cutout_flip_scale_rotate"
  mode: str = "single"
  siamese: bool = True
  brightness: float = 1.0
  saturation: float = 2.0
  contrast: float = 0.5
  crop_pad: float = 0.125
  cutout: float = 0.5
  scale: float = 1.2
  rotate: float = 15.0


def _draw(key, n, siamese, shape=()):
  """U(0, 1) draws of `shape` per image, [n, *shape]; identical rows when siamese."""
  if siamese:
    return jnp.broadcast_to(jax.random.uniform(key, (1, *shape)), (n, *shape))
  return jax.random.uniform(key, (n, *shape))


def color(key, x, spec):
  """Random brightness, saturation and contrast. x: [N, H, W, C]."""
  kb, ks, kc = jax.random.split(key, 3)
  n = x.shape[0]
  x = x + (_draw(kb, n, spec.siamese) - 0.5)[:, None, None, None] * spec.brightness
  mean = x.mean(axis=-1, keepdims=True)
  x = (x - mean) * (_draw(ks, n, spec.siamese) * spec.saturation)[:, None, None, None] + mean
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  x = (x - mean) * (_draw(kc, n, spec.siamese) + spec.contrast)[:, None, None, None] + mean
  return x


def crop(key, x, spec):
  """Random translation by up to `crop_pad` of the size, zero padded. x: [N, H, W, C]."""
  n, h, w, _ = x.shape
  ph, pw = int(h * spec.crop_pad + 0.5), int(w * spec.crop_pad + 0.5)
  shift = jnp.floor(_draw(key, n, spec.siamese, (2,)) * jnp.array([2 * ph + 1, 2 * pw + 1]))
  shift = shift.astype(jnp.int32)
  padded = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  take = lambda img, s: jax.lax.dynamic_slice(img, (s[0], s[1], jnp.zeros_like(s[0])),
                                               (h, w, x.shape[-1]))
  return jax.vmap(take)(padded, shift)


def cutout(key, x, spec):
  """Zeroes one random square of side `cutout` * size per image. x: [N, H, W, C]."""
  n, h, w, _ = x.shape
  ch, cw = int(h * spec.cutout + 0.5), int(w * spec.cutout + 0.5)
  centre = _draw(key, n, spec.siamese, (2,)) * jnp.array([h + 1 - ch % 2, w + 1 - cw % 2])
  centre = jnp.floor(centre)
  rows = jnp.arange(h)[None, :, None]
  cols = jnp.arange(w)[None, None, :]
  top = centre[:, 0, None, None] - ch // 2
  left = centre[:, 1, None, None] - cw // 2
  inside = (rows >= top) & (rows < top + ch) & (cols >= left) & (cols < left + cw)
  return x * (1.0 - inside[..., None].astype(x.dtype))


def flip(key, x, spec):
  """Horizontal flip with probability 1/2. x: [N, H, W, C]."""
  do = _draw(key, x.shape[0], spec.siamese) < 0.5
  return jnp.where(do[:, None, None, None], x[:, :, ::-1, :], x)


def _affine(x, theta):
  """Bilinear resampling of x [N, H, W, C] by affine maps theta [N, 2, 3] on [-1, 1] coordinates.

  Matches torch's affine_grid + grid_sample(align_corners=True) with zero padding.
  """
  _, h, w, _ = x.shape
  ys, xs = jnp.meshgrid(jnp.linspace(-1, 1, h), jnp.linspace(-1, 1, w), indexing="ij")
  grid = jnp.stack([xs, ys, jnp.ones_like(xs)], axis=-1)  # [H, W, 3] as (x, y, 1).
  source = jnp.einsum("hwk,njk->nhwj", grid, theta)  # [N, H, W, 2] as (x, y).
  col = (source[..., 0] + 1) * (w - 1) / 2
  row = (source[..., 1] + 1) * (h - 1) / 2

  def sample(img, r, c):
    return jax.vmap(
        lambda ch: jax.scipy.ndimage.map_coordinates(ch, [r, c], order=1, mode="constant"),
        in_axes=-1, out_axes=-1)(img)

  return jax.vmap(sample)(x, row, col)


def scale(key, x, spec):
  """Random anisotropic scaling in [1/ratio, ratio]. x: [N, H, W, C]."""
  n = x.shape[0]
  s = _draw(key, n, spec.siamese, (2,)) * (spec.scale - 1.0 / spec.scale) + 1.0 / spec.scale
  zeros = jnp.zeros((n,))
  theta = jnp.stack([jnp.stack([s[:, 0], zeros, zeros], -1),
                     jnp.stack([zeros, s[:, 1], zeros], -1)], axis=1)
  return _affine(x, theta)


def rotate(key, x, spec):
  """Random rotation by up to +-`rotate` degrees. x: [N, H, W, C]."""
  n = x.shape[0]
  angle = (_draw(key, n, spec.siamese) - 0.5) * 2 * spec.rotate / 180 * jnp.pi
  cos, sin, zeros = jnp.cos(angle), jnp.sin(angle), jnp.zeros((n,))
  theta = jnp.stack([jnp.stack([cos, sin, zeros], -1),
                     jnp.stack([-sin, cos, zeros], -1)], axis=1)
  return _affine(x, theta)


_FNS = {"color": color, "crop": crop, "cutout": cutout, "flip": flip, "scale": scale,
        "rotate": rotate}


def parse_strategy(strategy: str) -> tuple[str, ...]:
  """'color_crop_cutout' -> ('color', 'crop', 'cutout'), validating every family."""
  families = tuple(s for s in strategy.split("_") if s)
  for f in families:
    if f not in _FNS:
      raise errors.InputError(f"Unknown DSA family {f!r} in dsa.strategy={strategy!r}; accepted: {FAMILIES}.")
  return families


def augment(key: jax.Array, images: jax.Array, spec: DSASpec) -> jax.Array:
  """Applies DSA to a batch.

  Args:
    key: PRNG key; the same key gives the same output.
    images: [N, H, W, C] float.
    spec: the `DSASpec` (strategy, mode, siamese and the family ratios).

  Returns:
    [N, H, W, C], differentiable w.r.t. `images`.
  """
  families = parse_strategy(spec.strategy)
  if not families:
    return images
  if spec.mode == "all":
    for family, k in zip(families, jax.random.split(key, len(families))):
      images = _FNS[family](k, images, spec)
    return images
  if spec.mode != "single":
    raise errors.InputError(f"dsa.mode must be 'single' or 'all', got {spec.mode!r}.")
  pick_key, key = jax.random.split(key)
  which = jax.random.randint(pick_key, (), 0, len(families))
  branches = [functools.partial(_FNS[f], spec=spec) for f in families]
  return jax.lax.switch(which, branches, key, images)


def cutmix_box(key: jax.Array, lam: jax.Array, height: int, width: int) -> jax.Array:
  """[H, W] float mask, 1 inside a box of area ~ (1 - lam) H W at a uniform centre (clipped at
  the border), 0 elsewhere: where CutMix pastes the partner image."""
  cut = jnp.sqrt(1.0 - lam)
  kh, kw = jax.random.split(key)
  cy = jax.random.uniform(kh, (), minval=0, maxval=height)
  cx = jax.random.uniform(kw, (), minval=0, maxval=width)
  half_h, half_w = cut * height / 2, cut * width / 2
  rows = jnp.arange(height)[:, None] + 0.5
  cols = jnp.arange(width)[None, :] + 0.5
  return ((jnp.abs(rows - cy) < half_h) & (jnp.abs(cols - cx) < half_w)).astype(jnp.float32)


def paste_box(key: jax.Array, lam: jax.Array, images: jax.Array,
              partner_images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """CutMix's paste: `partner_images` ([N, H, W, C]) inside one box (`cutmix_box`) of area ~ (1 -
  lam) of every image of `images`. Returns (mixed images, kept: the share of every image that is
  still its own, a scalar)."""
  box = cutmix_box(key, lam, images.shape[1], images.shape[2])[None, :, :, None]
  return images * (1.0 - box) + partner_images * box, 1.0 - box.mean()


def cutmix(key: jax.Array, images: jax.Array, beta: float = 1.0) -> tuple[jax.Array, jax.Array,
                                                                          jax.Array]:
  """CutMix of a batch with a random permutation of itself (Yun et al. 2019; the student recipe
  of RDED and SRe2L): one lam ~ Beta(beta, beta) and one box (`cutmix_box`) for the batch.

  Args:
    key: PRNG key.
    images: [N, H, W, C].
    beta: the Beta distribution's parameter.

  Returns:
    (mixed images [N, H, W, C], partner index [N] (image i's box comes from image partner[i]),
    kept: the share of every image that is still its own, a scalar in [0, 1]).
  """
  k_perm, k_lam, k_box = jax.random.split(key, 3)
  partner = jax.random.permutation(k_perm, images.shape[0])
  lam = jax.random.beta(k_lam, beta, beta)
  mixed, kept = paste_box(k_box, lam, images, images[partner])
  return mixed, partner, kept
