"""The paper's test protocols (Sec. 3.2) as device-side kernels.

Each protocol turns a batch of images into softmax posteriors; ``evaluate``
averages them over scales, protocols and ensemble members, ``predict`` over
scales. Everything here works eagerly or under jit on any model callable as
``model(x)`` / ``model(x, valid_size=...)`` (a VGG in eval mode).

* ``center_crop``: one centre ``crop_size`` crop of the image resized to
  smallest side Q (the torchvision protocol; no flip).
* ``dense``: the whole image at Q through the convolutionalised net, the class
  score map averaged spatially, the posteriors of the image and its mirror
  averaged.
* ``multi_crop``: a regular 5x5 grid of ``crop_size`` crops and their flips,
  50 per scale, cut on device from the full image.
* ``multi_crop_dense``: the average of ``dense`` and ``multi_crop``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

PROTOCOLS = ('center_crop', 'dense', 'multi_crop', 'multi_crop_dense')
# The posterior sources (computed once per batch, model and scale) that each
# protocol averages.
PROTOCOL_SOURCES = {
    'center_crop': ('center_crop',),
    'dense': ('dense',),
    'multi_crop': ('multi_crop',),
    'multi_crop_dense': ('dense', 'multi_crop'),
}
# The input-pipeline mode each source reads: multi-crop is cut on device from
# the same full-image batch that dense evaluation uses.
SOURCE_MODE = {'center_crop': 'center_crop', 'dense': 'full',
               'multi_crop': 'full'}
MULTI_CROP_GRID = 5  # the paper's 5x5 grid (x 2 flips = 50 crops per scale)
MULTI_SCALE_OFFSET = 32  # the paper's Q in {S - 32, S, S + 32} for fixed S


# ----------------------------------------------------------------------------
# Test scales and protocol names.


def default_scales(config: ml_collections.ConfigDict, *,
                   multi_scale: bool = False) -> tuple[int, ...]:
  """The paper's test scales Q for a run trained at ``config.input`` scales.

  Fixed S (``scale_min == scale_max``): Q = S single-scale, {S-32, S, S+32}
  multi-scale. Jittered S in [S_min, S_max]: Q = (S_min + S_max) / 2
  single-scale (384 for [256, 512]), {S_min, mid, S_max} multi-scale. Scales
  below ``crop_size`` (tiny runs) are raised to it and duplicates dropped.

  Args:
    config: a run config with ``input.scale_min``, ``input.scale_max`` and
      ``input.crop_size``.
    multi_scale: the multi-scale set instead of the single scale.

  Returns:
    Sorted distinct scales.
  """
  s_min, s_max = int(config.input.scale_min), int(config.input.scale_max)
  crop = int(config.input.crop_size)
  if s_min > s_max:
    raise ValueError(f'config.input.scale_min={s_min} > scale_max={s_max}.')
  mid = (s_min + s_max) // 2
  if s_min == s_max:
    scales = ((s_min - MULTI_SCALE_OFFSET, s_min, s_min + MULTI_SCALE_OFFSET)
              if multi_scale else (s_min,))
  else:
    scales = (s_min, mid, s_max) if multi_scale else (mid,)
  clamped = tuple(sorted({max(q, crop) for q in scales}))
  if clamped != tuple(scales):
    logging.warning('Test scales %s raised to crop_size=%d: %s', scales, crop,
                    clamped)
  return clamped


def parse_scales(text: str | Sequence[int] | None) -> tuple[int, ...] | None:
  """Parses ``'256,384,512'`` (or a sequence of ints) into a tuple of ints."""
  if text is None or text == '':
    return None
  items = text.split(',') if isinstance(text, str) else list(text)
  try:
    scales = tuple(int(str(q).strip()) for q in items if str(q).strip())
  except ValueError as e:
    raise ValueError(f'Bad scales {text!r}: expected comma-separated integers '
                     'such as 256,384,512.') from e
  if not scales or any(q <= 0 for q in scales):
    raise ValueError(f'Bad scales {text!r}: need positive integers.')
  return scales


def parse_protocols(text: str | Sequence[str]) -> tuple[str, ...]:
  """Parses ``'dense,multi_crop'`` into validated protocol names."""
  items = text.split(',') if isinstance(text, str) else list(text)
  protocols = tuple(dict.fromkeys(p.strip() for p in items if p.strip()))
  bad = [p for p in protocols if p not in PROTOCOLS]
  if bad or not protocols:
    raise ValueError(f'Unknown protocol(s) {bad or text!r}; valid: '
                     f'{", ".join(PROTOCOLS)}.')
  return protocols


def passes_per_image(protocol: str, num_scales: int,
                     grid: int = MULTI_CROP_GRID) -> int:
  """Forward passes per image and network: crops, or whole images (dense).

  The paper's count: 50 crops per scale for multi-crop, 150 over 3 scales.
  """
  per_scale = {'center_crop': 1, 'dense': 2, 'multi_crop': 2 * grid * grid,
               'multi_crop_dense': 2 + 2 * grid * grid}[protocol]
  return per_scale * num_scales


# ----------------------------------------------------------------------------
# Kernels.


def _softmax(scores: jax.Array) -> jax.Array:
  return jax.nn.softmax(scores.astype(jnp.float32), axis=-1)


def flip_valid(images: jax.Array, valid_size: jax.Array) -> jax.Array:
  """Mirrors each image's valid region left-right, keeping it top-left.

  Args:
    images: ``(N, H, W, C)`` canvases, each image at the top-left.
    valid_size: ``(N, 2)`` int ``(height, width)`` of each image.

  Returns:
    The canvases with columns ``0..w-1`` reversed per image; the padding
    columns are left where they are.
  """
  cols = jnp.arange(images.shape[2])[None, :]
  width = jnp.asarray(valid_size)[:, 1:2]
  index = jnp.where(cols < width, width - 1 - cols, cols)
  return jax.vmap(lambda im, i: jnp.take(im, i, axis=1))(images, index)


def dense_posteriors(model: Callable[..., jax.Array], images: jax.Array,
                     valid_size: jax.Array | None = None, *,
                     flip: bool = True) -> jax.Array:
  """Dense evaluation: softmax of the spatially averaged class score map.

  Args:
    model: a VGG (in eval mode) or any ``model(x, valid_size=...)`` returning
      spatially averaged scores ``(N, classes)``.
    images: normalised ``(N, H, W, C)``; with ``valid_size``, each image at the
      top-left of a canvas whose padding is ignored by the model.
    valid_size: optional ``(N, 2)`` int image sizes; None: the whole input.
    flip: also evaluate the horizontal flip and average the two posteriors.

  Returns:
    Posteriors ``(N, classes)``, float32.
  """
  kwargs = {} if valid_size is None else {'valid_size': valid_size}
  p = _softmax(model(images, **kwargs))
  if flip:
    flipped = (images[:, :, ::-1] if valid_size is None
               else flip_valid(images, valid_size))
    p = 0.5 * (p + _softmax(model(flipped, **kwargs)))
  return p


def crop_offsets(height: int, width: int, crop_size: int,
                 grid: int = MULTI_CROP_GRID) -> np.ndarray:
  """Top-left corners of the multi-crop grid for one image (host reference).

  ``round(linspace(0, h - c, grid)) x round(linspace(0, w - c, grid))``, so the
  four corner crops touch the image corners.

  Args:
    height: image height.
    width: image width.
    crop_size: crop side ``c``.
    grid: crops per side.

  Returns:
    ``(grid * grid, 2)`` int ``(top, left)``, row-major.

  Raises:
    ValueError: when the image is smaller than the crop.
  """
  if height < crop_size or width < crop_size:
    raise ValueError(f'Image {height}x{width} is smaller than the {crop_size} '
                     'multi-crop window; use a test scale Q >= crop_size.')
  fractions = np.linspace(0.0, 1.0, grid) if grid > 1 else np.array([0.5])
  tops = np.round(fractions * (height - crop_size)).astype(np.int32)
  lefts = np.round(fractions * (width - crop_size)).astype(np.int32)
  return np.stack(np.meshgrid(tops, lefts, indexing='ij'), -1).reshape(-1, 2)


def crop_grid(valid_size: jax.Array, crop_size: int,
              grid: int = MULTI_CROP_GRID) -> jax.Array:
  """``crop_offsets`` for a batch on device: ``(N, grid * grid, 2)`` int32."""
  fractions = (jnp.linspace(0.0, 1.0, grid) if grid > 1
               else jnp.array([0.5]))
  span = jnp.maximum(jnp.asarray(valid_size) - crop_size, 0)
  starts = jnp.round(fractions[None, :, None] *
                     span[:, None, :].astype(jnp.float32)).astype(jnp.int32)
  tops, lefts = starts[:, :, 0], starts[:, :, 1]
  tops, lefts = jnp.broadcast_arrays(tops[:, :, None], lefts[:, None, :])
  return jnp.stack([tops, lefts], -1).reshape(tops.shape[0], -1, 2)


def _crop_at(images: jax.Array, offsets: jax.Array, crop_size: int
             ) -> jax.Array:
  """One ``crop_size`` window per image at ``offsets`` ``(N, 2)``."""
  size = (crop_size, crop_size, images.shape[-1])
  return jax.vmap(lambda im, o: jax.lax.dynamic_slice(
      im, (o[0], o[1], 0), size))(images, offsets)


def multi_crop_windows(images: jax.Array, valid_size: jax.Array,
                       crop_size: int, grid: int = MULTI_CROP_GRID
                       ) -> tuple[jax.Array, jax.Array]:
  """All grid crops of each image (for inspection; evaluation streams them).

  Args:
    images: ``(N, H, W, C)`` canvases, each image at the top-left.
    valid_size: ``(N, 2)`` int image sizes.
    crop_size: crop side.
    grid: crops per side.

  Returns:
    ``(crops, offsets)``: ``(N, grid*grid, c, c, C)`` and ``(N, grid*grid, 2)``.
  """
  offsets = crop_grid(valid_size, crop_size, grid)
  crops = jax.vmap(lambda o: _crop_at(images, o, crop_size), in_axes=1,
                   out_axes=1)(offsets)
  return crops, offsets


def multi_crop_posteriors(model: Callable[..., jax.Array], images: jax.Array,
                          valid_size: jax.Array, *, crop_size: int,
                          grid: int = MULTI_CROP_GRID, flip: bool = True
                          ) -> jax.Array:
  """Multi-crop evaluation: posteriors averaged over a grid of crops (+ flips).

  The ``grid * grid`` positions are visited one after the other, each as a
  batch of N crops (and N flipped crops), so memory stays that of an N-crop
  batch.

  Args:
    model: a VGG in eval mode (or any ``model(x) -> (N, classes)``).
    images: normalised ``(N, H, W, C)`` canvases, each image at the top-left.
    valid_size: ``(N, 2)`` int image sizes, each at least ``crop_size``.
    crop_size: crop side (the model's training crop).
    grid: crops per side (the paper: 5).
    flip: also evaluate each crop's horizontal flip.

  Returns:
    Posteriors ``(N, classes)``, float32, the mean over ``grid**2 * (1 + flip)``
    crops.
  """
  offsets = jnp.swapaxes(crop_grid(valid_size, crop_size, grid), 0, 1)

  def position(off):
    crops = _crop_at(images, off, crop_size)
    p = _softmax(model(crops))
    return p + _softmax(model(crops[:, :, ::-1])) if flip else p

  total = jax.lax.map(position, offsets).sum(axis=0)
  return total / (offsets.shape[0] * (2 if flip else 1))


def center_crop_posteriors(model: Callable[..., jax.Array], images: jax.Array
                           ) -> jax.Array:
  """Softmax posteriors of already-cropped, normalised images."""
  return _softmax(model(images))


def source_posteriors(source: str, model: Callable[..., jax.Array],
                      images: jax.Array, valid_size: jax.Array, *,
                      crop_size: int, grid: int = MULTI_CROP_GRID
                      ) -> jax.Array:
  """The posteriors of one source (a key of ``SOURCE_MODE``), with flips.

  Args:
    source: ``'dense'``, ``'multi_crop'`` or ``'center_crop'``.
    model: a VGG in eval mode.
    images: normalised ``(N, H, W, C)``, each image at the top-left.
    valid_size: ``(N, 2)`` int image sizes.
    crop_size: the multi-crop window.
    grid: multi-crop grid side.
  """
  if source == 'dense':
    return dense_posteriors(model, images, valid_size, flip=True)
  if source == 'multi_crop':
    return multi_crop_posteriors(model, images, valid_size,
                                 crop_size=crop_size, grid=grid, flip=True)
  if source == 'center_crop':
    return center_crop_posteriors(model, images)
  raise ValueError(f'Unknown posterior source {source!r}; valid: '
                   f'{", ".join(SOURCE_MODE)}.')


@dataclasses.dataclass(eq=False)
class SourceFn:
  """``(weights, uint8 images, valid_size) -> posteriors`` for one network.

  A pure function of the weights, to be jitted: the graph, normalisation and
  source are fixed, so networks of one architecture and preprocessing share
  one compiled program and pass their own weights.

  Attributes:
    graphdef: the network's graph (from ``nnx.split``), in eval mode.
    rng_state: its RNG state; eval mode draws no random numbers, so any
      network's will do.
    normalize: ``uint8 images -> float32`` as the weights expect.
    source: a key of ``SOURCE_MODE``.
    crop_size: the multi-crop window.
    grid: multi-crop grid side.
  """
  graphdef: Any
  rng_state: Any
  normalize: Callable[[jax.Array], jax.Array]
  source: str
  crop_size: int
  grid: int = MULTI_CROP_GRID

  def __call__(self, weights: Any, images: jax.Array, valid_size: jax.Array
               ) -> jax.Array:
    net = nnx.merge(self.graphdef, self.rng_state, weights)
    return source_posteriors(self.source, net, self.normalize(images),
                             valid_size, crop_size=self.crop_size,
                             grid=self.grid)
