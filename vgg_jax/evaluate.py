r"""The paper's test protocols (Sec. 3.2 and 4), ensembles and the eval CLI.

Protocols (each gives softmax posteriors per image; posteriors are averaged
over scales Q, over the two protocols of ``multi_crop_dense`` and over the
members of an ensemble):

* ``center_crop``: smallest side resized to Q, one centre ``crop_size`` crop
  (the torchvision protocol; no flip).
* ``dense``: the whole image at Q through the convolutionalised net, the
  class score map averaged spatially, softmax posteriors of the image and its
  horizontal flip averaged. Images sit on a fixed canvas per Q (side
  ``Q * config.input.dense_max_aspect`` rounded up to 32), so a long side
  beyond it is centre-cropped by the input pipeline.
* ``multi_crop``: a regular 5x5 grid of ``crop_size`` crops and their flips,
  50 per scale, cut on device from the full image.
* ``multi_crop_dense``: the average of ``dense`` and ``multi_crop``.

Command line (the run's config is read from its workdir)::

    python -m vgg_jax.evaluate --workdir=DIR --protocol=dense \
      --scales=256,384,512
    python -m vgg_jax.evaluate --workdir=DIR --multi_scale \
      --protocol=dense,multi_crop,multi_crop_dense --ensemble=DIR2 \
      --config.data.manual_dir=/data/imagenet

Results go to the console, ``DIR/eval/*.json`` and TensorBoard (``DIR/eval``).

From a notebook::

    result = evaluate.evaluate_model(model, config, protocol='dense',
                                     scales=(256, 384, 512), split='validation')
    result['top1_error'], result['top5_error']
"""

from __future__ import annotations

import argparse
import ast
import collections
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
import ml_collections
import numpy as np
from flax import nnx

from vgg_jax import preprocessing
from vgg_jax import sharding as sharding_lib

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
TOP_K = 5
PROGRESS_EVERY_S = 60.0  # seconds between progress log lines

IteratorFn = Callable[..., Iterable[Mapping[str, np.ndarray]]]


# ----------------------------------------------------------------------------
# Test scales.


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


def _check_scales(scales: Sequence[int], crop_size: int, what: str):
  small = [q for q in scales if q < crop_size]
  if small:
    raise ValueError(
        f'Test scale(s) {small} of {what} are smaller than crop_size='
        f'{crop_size}: the smallest side Q must be at least the crop (and the '
        'net\'s input) size.')


# ----------------------------------------------------------------------------
# Device-side protocol pieces (work eagerly or under jit, on any model
# callable as `model(x, valid_size=...)`).


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
  def posterior(x):
    if valid_size is None:
      return jax.nn.softmax(model(x).astype(jnp.float32), axis=-1)
    return jax.nn.softmax(
        model(x, valid_size=valid_size).astype(jnp.float32), axis=-1)

  p = posterior(images)
  if flip:
    flipped = (images[:, :, ::-1] if valid_size is None
               else flip_valid(images, valid_size))
    p = 0.5 * (p + posterior(flipped))
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
    p = jax.nn.softmax(model(crops).astype(jnp.float32), axis=-1)
    if flip:
      p = p + jax.nn.softmax(model(crops[:, :, ::-1]).astype(jnp.float32),
                             axis=-1)
    return p

  total = jax.lax.map(position, offsets).sum(axis=0)
  return total / (offsets.shape[0] * (2 if flip else 1))


def center_crop_posteriors(model: Callable[..., jax.Array], images: jax.Array
                           ) -> jax.Array:
  """Softmax posteriors of already-cropped, normalised images."""
  return jax.nn.softmax(model(images).astype(jnp.float32), axis=-1)


def topk_hits(posteriors: jax.Array, labels: jax.Array, mask: jax.Array,
              k: int = TOP_K) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Counts of top-1 and top-k hits and of counted examples.

  Args:
    posteriors: ``(N, classes)``.
    labels: ``(N,)`` int.
    mask: ``(N,)`` bool; False rows (padding) are not counted.
    k: the top-k (clipped to the number of classes).

  Returns:
    ``(top1, topk, count)`` int32 scalars.
  """
  k = min(k, posteriors.shape[-1])
  _, top = jax.lax.top_k(posteriors, k)
  hit = top == labels[:, None]
  return ((hit[:, 0] & mask).sum(), (hit.any(axis=-1) & mask).sum(),
          mask.sum())


# ----------------------------------------------------------------------------
# Evaluation loop.


@dataclasses.dataclass
class Member:
  """One network to evaluate (an ensemble has several).

  Attributes:
    model: the VGG; evaluation uses an eval-mode view, the object is unchanged.
    config: its run config (``input.crop_size``, scales, normalisation).
    normalization: input normalisation the weights expect; None: the config's.
    mean_rgb: the mean for ``mean_rgb`` / ``caffe_bgr``; None: the config's.
    scales: its test scales Q; None: ``default_scales(config)``.
    name: label for logs and results (e.g. the workdir).
    step: checkpoint step, if known.
    metadata: the checkpoint's metadata (``class_names``, ...), if loaded.
  """
  model: nnx.Module
  config: ml_collections.ConfigDict
  normalization: str | None = None
  mean_rgb: Sequence[float] | None = None
  scales: Sequence[int] | None = None
  name: str = ''
  step: int | None = None
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def normalization_spec(self) -> tuple[str, tuple[float, ...] | None]:
    """``(normalization, mean_rgb)`` the weights expect (checkpoint first)."""
    normalization = self.normalization or self.config.input.normalization
    mean_rgb = (self.mean_rgb if self.mean_rgb is not None
                else self.config.input.get('mean_rgb'))
    return normalization, (None if mean_rgb is None
                           else tuple(float(v) for v in mean_rgb))

  def normalizer(self) -> Callable[[jax.Array], jax.Array]:
    """``uint8 images -> float32`` with the normalisation the weights expect."""
    normalization, mean_rgb = self.normalization_spec()
    kwargs = {} if mean_rgb is None else {'mean_rgb': mean_rgb}
    return lambda x: preprocessing.normalize(x, normalization, **kwargs)

  def eval_split(self):
    """``(graphdef, rng_state, weights)`` of an eval-mode view of the model.

    ``weights`` holds everything but the dropout RNG state (parameters, BN
    statistics); ``nnx.merge(graphdef, rng_state, weights)`` rebuilds it. The
    member's own model object keeps its mode.
    """
    model = nnx.merge(*nnx.split(self.model))
    model.eval()
    return nnx.split(model, nnx.RngState, ...)


def _replicate(tree, sharding: NamedSharding):
  """Puts every leaf on every device (works across processes)."""
  def put(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x, x.shape)
  return jax.tree.map(put, tree)


class _Program:
  """One jitted posterior source; counts and logs its compilations.

  Members with the same graph (architecture, dtype) and preprocessing share
  one program and pass their own weights, so an ensemble of nets of one
  architecture compiles once.
  """

  def __init__(self, graphdef, rng_state, *, source: str,
               normalize: Callable[[jax.Array], jax.Array], crop_size: int,
               grid: int, mesh: jax.sharding.Mesh):
    self.source, self.traces = source, []
    replicated = sharding_lib.replicated(mesh)
    batch = sharding_lib.batch_sharding(mesh)

    def run(weights, images, valid_size):
      self.traces.append(tuple(images.shape))
      logging.info('Compiling %s program #%d for input %s', source,
                   len(self.traces), images.shape)
      # Eval mode draws no random numbers: any member's RNG state will do.
      net = nnx.merge(graphdef, rng_state, weights)
      x = normalize(images)
      if source == 'dense':
        return dense_posteriors(net, x, valid_size, flip=True)
      if source == 'multi_crop':
        return multi_crop_posteriors(net, x, valid_size, crop_size=crop_size,
                                     grid=grid, flip=True)
      return center_crop_posteriors(net, x)

    self._run = jax.jit(run, in_shardings=(replicated, batch, batch),
                        out_shardings=batch)

  def __call__(self, weights, images, valid_size):
    return self._run(weights, images, valid_size)


def _global(sharding: NamedSharding, local: np.ndarray) -> jax.Array:
  return jax.make_array_from_process_local_data(sharding, np.asarray(local))


def _create_iterator(config, *, split, scale, mode, global_batch_size):
  # Imported here: it pulls in TFDS, which predict and notebooks that bring
  # their own batches do not need.
  from vgg_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.create_eval_iterator(
      config, split=split, scale=scale, mode=mode,
      global_batch_size=global_batch_size)


def _check_same_examples(batches: Mapping[Any, Mapping[str, np.ndarray]]):
  """All input streams must hold the same examples in the same order."""
  keys = list(batches)
  ref = batches[keys[0]]
  for key in keys[1:]:
    b = batches[key]
    same = (np.array_equal(np.asarray(b['mask']), np.asarray(ref['mask'])) and
            np.array_equal(np.where(ref['mask'], b['label'], 0),
                           np.where(ref['mask'], ref['label'], 0)))
    if not same:
      raise RuntimeError(
          f'The eval input streams {keys[0]} and {key} disagree on labels or '
          'padding: the eval iterator must yield the same examples in the '
          'same order at every scale and mode.')


@dataclasses.dataclass
class _Plan:
  """What one evaluation pass computes.

  Attributes:
    scales: per member, its test scales.
    weights: per member, its replicated weights.
    programs: per member, ``{source: _Program}`` (shared where possible).
    terms: per protocol, ``[((member, source, Q), coefficient, stream)]``:
      the posteriors it averages and the input stream each reads.
  """
  scales: list[tuple[int, ...]]
  weights: list[Any]
  programs: list[dict[str, _Program]]
  terms: dict[str, list[tuple[tuple[int, str, int], float, tuple]]]

  def stream_keys(self) -> list[tuple]:
    return list(dict.fromkeys(
        k for terms in self.terms.values() for _, _, k in terms))

  def sources(self) -> list[tuple[int, str, int]]:
    return list(dict.fromkeys(
        t for terms in self.terms.values() for t, _, _ in terms))

  def used_programs(self, protocol: str) -> list[_Program]:
    progs = {id(self.programs[i][s]): self.programs[i][s]
             for (i, s, _), _, _ in self.terms[protocol]}
    return list(progs.values())


def _stream_key(member: Member, source: str, q: int) -> tuple:
  """Input stream of a source: (mode, Q, crop); only centre crops need crop."""
  crop = int(member.config.input.crop_size)
  return (SOURCE_MODE[source], q, crop if source == 'center_crop' else None)


def _plan(members: Sequence[Member], protocols: Sequence[str],
          scales: Sequence[int] | None, multi_scale: bool, grid: int,
          mesh: jax.sharding.Mesh) -> _Plan:
  """Scales, weights, programs and averaging coefficients of every member."""
  sources = sorted({s for p in protocols for s in PROTOCOL_SOURCES[p]})
  member_scales, member_weights, programs, shared = [], [], [], {}
  for i, m in enumerate(members):
    qs = tuple(scales) if scales else (
        tuple(m.scales) if m.scales else
        default_scales(m.config, multi_scale=multi_scale))
    crop = int(m.config.input.crop_size)
    _check_scales(qs, crop, m.name or f'member {i}')
    member_scales.append(qs)
    graphdef, rng_state, weights = m.eval_split()
    member_weights.append(_replicate(weights, sharding_lib.replicated(mesh)))
    progs = {}
    for s in sources:
      key = (graphdef, s, m.normalization_spec(), crop, grid)
      if key not in shared:
        shared[key] = _Program(graphdef, rng_state, source=s,
                               normalize=m.normalizer(), crop_size=crop,
                               grid=grid, mesh=mesh)
      progs[s] = shared[key]
    programs.append(progs)
  # Averaged over scales, then over the protocol's sources, then members.
  terms = {p: [((i, s, q),
                1.0 / (len(members) * len(PROTOCOL_SOURCES[p]) * len(qs)),
                _stream_key(m, s, q))
               for i, (m, qs) in enumerate(zip(members, member_scales))
               for s in PROTOCOL_SOURCES[p] for q in qs]
           for p in protocols}
  return _Plan(member_scales, member_weights, programs, terms)


def _open_streams(keys: Sequence[tuple], data_config, *, split: str,
                  batch_size: int, iterator_fn: IteratorFn) -> dict:
  """One eval iterator per (mode, Q, crop) key.

  ``data.num_workers`` is shared out among the streams (at least one each),
  so a multi-scale, multi-protocol pass does not start a worker pool per
  stream.
  """
  workers = int(data_config.data.get('num_workers', 0))
  streams = {}
  for key in keys:
    mode, q, crop = key
    config = data_config.copy_and_resolve_references()
    if crop is not None:
      config.input.crop_size = crop
    if workers > 0:
      config.data.num_workers = max(1, workers // len(keys))
    streams[key] = iter(iterator_fn(config, split=split, scale=q, mode=mode,
                                    global_batch_size=batch_size))
  return streams


def _next_batches(streams: Mapping[tuple, Any], stream_time) -> dict | None:
  """The next batch of every stream; None when all have ended together."""
  batches = {}
  for key, it in streams.items():
    t = time.perf_counter()
    batches[key] = next(it, None)
    stream_time[key] += time.perf_counter() - t
  ended = [k for k, b in batches.items() if b is None]
  if not ended:
    _check_same_examples(batches)
    return batches
  if len(ended) != len(batches):
    raise RuntimeError(f'Eval input streams ended at different batches '
                       f'({ended} first); they must be the same length.')
  return None


def _device_inputs(batch: Mapping[str, np.ndarray], sharding: NamedSharding
                   ) -> tuple[jax.Array, jax.Array]:
  """Global ``(images, valid_size)``; a centre crop is all image."""
  images = batch['image']
  if 'valid_size' in batch:
    valid = np.asarray(batch['valid_size'], np.int32)
  else:
    valid = np.broadcast_to(np.asarray(images.shape[1:3], np.int32),
                            (images.shape[0], 2))
  return _global(sharding, images), _global(sharding, valid)


@functools.partial(jax.jit, static_argnums=1)
def _average(posteriors, coefficients):
  return sum(c * p for c, p in zip(coefficients, posteriors))


@functools.partial(jax.jit, static_argnums=1)
def _score(posteriors, coefficients, labels, mask):
  return topk_hits(_average(posteriors, coefficients), labels, mask)


def evaluate(members: Sequence[Member], *,
             protocols: str | Sequence[str] = ('dense',),
             scales: Sequence[int] | None = None,
             multi_scale: bool = False,
             split: str | None = None,
             batch_size: int | None = None,
             data_config: ml_collections.ConfigDict | None = None,
             iterator_fn: IteratorFn | None = None,
             grid: int = MULTI_CROP_GRID,
             return_posteriors: bool = False) -> dict[str, dict[str, Any]]:
  """Evaluates one network or an ensemble with one or more protocols.

  One pass over the split serves every protocol: each batch is read once per
  (input mode, scale) and each (member, source, scale) posterior is computed
  once, then averaged per protocol (over scales, over the sources of
  ``multi_crop_dense`` and over members, in that order). Batches are sharded
  over all devices of all processes on a 1-D ``'data'`` mesh; weights are
  replicated. A program is compiled once per (architecture and
  preprocessing, source, input shape): with the input pipeline's fixed
  canvas per scale, once per scale.

  Args:
    members: the networks; one for a single model, several for an ensemble.
    protocols: names from ``PROTOCOLS`` (a list or ``'a,b'``).
    scales: test scales Q for every member; None: each member's own
      ``scales`` or ``default_scales(config, multi_scale=...)``.
    multi_scale: with ``scales=None``, use the paper's multi-scale set.
    split: dataset split; None: ``data_config.data.eval_split``.
    batch_size: global batch; None: ``data_config.train.eval_batch_size``.
      Must divide by the number of devices.
    data_config: config whose ``data`` and ``input`` sections read the
      dataset; None: the first member's.
    iterator_fn: ``fn(config, *, split, scale, mode, global_batch_size)``
      yielding batches as ``input_pipeline.create_eval_iterator`` does
      (the default).
    grid: multi-crop grid side (the paper: 5).
    return_posteriors: also return each protocol's per-example posteriors
      (``'posteriors'``, ``(examples, classes)``), ``'labels'`` and, when the
      batches carry it, the split ``'index'`` of each row, gathered from all
      processes and sorted by that index; only for small splits.

  Returns:
    ``{protocol: result}`` with ``top1_error``, ``top5_error``,
    ``top1_accuracy``, ``top5_accuracy`` (fractions), ``num_examples``,
    ``wall_time_s`` (reading the protocol's batches and running its programs;
    a source shared by two protocols counts for both), ``total_wall_time_s``
    (the whole pass), ``scales``, ``programs_compiled`` and descriptive
    fields.
  """
  if not members:
    raise ValueError('evaluate() needs at least one member.')
  protocols = parse_protocols(protocols)
  data_config = data_config or members[0].config
  split = split or data_config.data.eval_split
  batch_size = int(data_config.train.eval_batch_size if batch_size is None
                   else batch_size)
  if batch_size < 1:
    raise ValueError(f'Eval batch size must be positive, got {batch_size}.')
  num_classes = sorted({int(m.model.num_classes) for m in members})
  if len(num_classes) > 1:
    raise ValueError(f'Ensemble members disagree on num_classes: '
                     f'{num_classes}.')
  mesh = sharding_lib.create_mesh()
  if batch_size % mesh.size:
    raise ValueError(f'Eval batch size {batch_size} is not divisible by the '
                     f'{mesh.size} devices; pass a multiple (e.g. '
                     f'{mesh.size * max(1, batch_size // mesh.size)}).')
  batch_sharding = sharding_lib.batch_sharding(mesh)
  plan = _plan(members, protocols, scales, multi_scale, grid, mesh)
  streams = _open_streams(plan.stream_keys(), data_config, split=split,
                          batch_size=batch_size,
                          iterator_fn=iterator_fn or _create_iterator)
  logging.info('Evaluating %s on %s (%s) with %d member(s), scales %s, '
               'global batch %d over %d device(s)', ','.join(protocols),
               data_config.data.dataset, split, len(members), plan.scales,
               batch_size, mesh.size)

  counts = {p: np.zeros(3, np.int64) for p in protocols}
  stream_time = collections.defaultdict(float)
  source_time = collections.defaultdict(float)
  score_time = collections.defaultdict(float)
  kept = collections.defaultdict(list)
  start = last_log = time.perf_counter()
  num_batches = 0
  while (batches := _next_batches(streams, stream_time)) is not None:
    first = next(iter(batches.values()))
    labels = _global(batch_sharding, np.asarray(first['label'], np.int32))
    mask = _global(batch_sharding, np.asarray(first['mask'], bool))
    inputs = {k: _device_inputs(b, batch_sharding) for k, b in batches.items()}
    posteriors = {}
    for i, s, q in plan.sources():
      t = time.perf_counter()
      posteriors[(i, s, q)] = jax.block_until_ready(plan.programs[i][s](
          plan.weights[i], *inputs[_stream_key(members[i], s, q)]))
      source_time[(i, s, q)] += time.perf_counter() - t
    for p in protocols:
      t = time.perf_counter()
      terms = [posteriors[k] for k, _, _ in plan.terms[p]]
      coefficients = tuple(c for _, c, _ in plan.terms[p])
      counts[p] += np.asarray(jax.device_get(
          _score(terms, coefficients, labels, mask)), np.int64)
      if return_posteriors:
        kept[p].append(_gather(_average(terms, coefficients), mask))
      score_time[p] += time.perf_counter() - t
    if return_posteriors:
      kept['labels'].append(_gather(labels, mask))
      if 'index' in first:
        kept['index'].append(_gather(_global(
            batch_sharding, np.asarray(first['index'], np.int32)), mask))
    num_batches += 1
    if time.perf_counter() - last_log > PROGRESS_EVERY_S:
      last_log = time.perf_counter()
      seen = int(counts[protocols[0]][2])
      logging.info('Evaluated %d batches, %d examples (%.1f examples/s)',
                   num_batches, seen, seen / (last_log - start))
  total_time = time.perf_counter() - start
  for prog in {id(p): p for progs in plan.programs
               for p in progs.values()}.values():
    logging.info('%s: compiled %d program(s), for inputs %s', prog.source,
                 len(prog.traces), prog.traces)

  same_scales = len(set(plan.scales)) == 1
  results = {}
  for p in protocols:
    top1, top5, n = (int(v) for v in counts[p])
    if n == 0:
      raise ValueError(f'Split {split!r} of {data_config.data.dataset} gave '
                       'no examples to evaluate.')
    used = plan.used_programs(p)
    results[p] = {
        'protocol': p,
        'split': split,
        'dataset': data_config.data.dataset,
        'scales': (list(plan.scales[0]) if same_scales
                   else [list(q) for q in plan.scales]),
        'members': [m.name for m in members],
        'steps': [m.step for m in members],
        'num_examples': n,
        'top1_accuracy': top1 / n,
        'top5_accuracy': top5 / n,
        'top1_error': 1.0 - top1 / n,
        'top5_error': 1.0 - top5 / n,
        'top_k': min(TOP_K, num_classes[0]),
        'wall_time_s': (
            score_time[p] + sum(source_time[k] for k, _, _ in plan.terms[p])
            + sum(stream_time[k] for k in {k for _, _, k in plan.terms[p]})),
        'total_wall_time_s': total_time,
        'num_batches': num_batches,
        'global_batch_size': batch_size,
        'num_devices': mesh.size,
        'num_processes': jax.process_count(),
        'passes_per_image': _passes_per_image(p, plan.scales, grid),
        'programs_compiled': sum(len(prog.traces) for prog in used),
        'program_input_shapes': {
            s: [list(t) for prog in used if prog.source == s
                for t in prog.traces]
            for s in PROTOCOL_SOURCES[p]},
    }
    if return_posteriors:
      results[p].update(_ordered_posteriors(kept, p))
  return results


def _ordered_posteriors(kept: Mapping[str, list], protocol: str
                        ) -> dict[str, np.ndarray]:
  """Gathered posteriors and labels, sorted by split index when known."""
  out = {'posteriors': np.concatenate(kept[protocol], 0),
         'labels': np.concatenate(kept['labels'], 0)}
  if kept.get('index'):
    index = np.concatenate(kept['index'], 0)
    order = np.argsort(index, kind='stable')
    out = {k: v[order] for k, v in out.items()}
    out['index'] = index[order]
  return out


def _passes_per_image(protocol: str, member_scales, grid: int) -> int:
  """Forward passes per image and member: crops, or whole images (dense).

  The paper's count: 50 crops per scale for multi-crop, 150 over 3 scales;
  with members of different scale counts, the first member's.
  """
  per_scale = {'center_crop': 1, 'dense': 2, 'multi_crop': 2 * grid * grid,
               'multi_crop_dense': 2 + 2 * grid * grid}[protocol]
  return per_scale * len(member_scales[0])


def _gather(x: jax.Array, mask: jax.Array) -> np.ndarray:
  """A global batch on the host of every process, padding rows dropped."""
  if jax.process_count() > 1:
    x, mask = multihost_utils.process_allgather((x, mask), tiled=True)
  x, mask = np.asarray(x), np.asarray(mask)
  return x[mask]


def evaluate_model(model: nnx.Module, config: ml_collections.ConfigDict, *,
                   protocol: str = 'dense',
                   scales: Sequence[int] | None = None,
                   split: str | None = None, multi_scale: bool = False,
                   normalization: str | None = None,
                   mean_rgb: Sequence[float] | None = None,
                   batch_size: int | None = None,
                   iterator_fn: IteratorFn | None = None,
                   return_posteriors: bool = False) -> dict[str, Any]:
  """Evaluates one model on a dataset split with one protocol (notebooks).

  Args:
    model: a VGG (its mode is left unchanged; evaluation uses eval mode).
    config: its run config (dataset, crop size, scales, normalisation).
    protocol: one of ``PROTOCOLS``.
    scales: test scales Q; None: the paper's default for the run's S.
    split: dataset split; None: ``config.data.eval_split``.
    multi_scale: with ``scales=None``, the multi-scale default set.
    normalization: input normalisation the weights expect; None: the config's.
    mean_rgb: its mean; None: the config's.
    batch_size: global batch; None: ``config.train.eval_batch_size``.
    iterator_fn: custom batch source (see ``evaluate``).
    return_posteriors: also return per-example posteriors and labels.

  Returns:
    The result dict (``top1_error``, ``top5_error``, ``num_examples``, ...).
  """
  member = Member(model, config, normalization=normalization,
                  mean_rgb=mean_rgb)
  return evaluate([member], protocols=(protocol,), scales=scales,
                  multi_scale=multi_scale, split=split, batch_size=batch_size,
                  iterator_fn=iterator_fn,
                  return_posteriors=return_posteriors)[protocol]


# ----------------------------------------------------------------------------
# Reporting.


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
  """A console table, one row per protocol."""
  header = (f'{"protocol":<17} {"scales":<16} {"top-1 err":>9} '
            f'{"top-5 err":>9} {"top-1 acc":>9} {"top-5 acc":>9} '
            f'{"examples":>9} {"time (s)":>9}')
  lines = [header, '-' * len(header)]
  for p, r in results.items():
    scales = ','.join(str(q) for q in np.ravel(r['scales']))
    lines.append(
        f'{p:<17} {scales:<16} {100 * r["top1_error"]:>8.2f}% '
        f'{100 * r["top5_error"]:>8.2f}% {100 * r["top1_accuracy"]:>8.2f}% '
        f'{100 * r["top5_accuracy"]:>8.2f}% {r["num_examples"]:>9d} '
        f'{r["wall_time_s"]:>9.1f}')
  return '\n'.join(lines)


def result_name(result: Mapping[str, Any]) -> str:
  """File stem / TensorBoard prefix, e.g. ``dense_q256-384-512_validation``."""
  scales = '-'.join(str(q) for q in np.ravel(result['scales']))
  name = f'{result["protocol"]}_q{scales}_{result["split"]}'
  if len(result['members']) > 1:
    name += f'_ensemble{len(result["members"])}'
  return name


def write_results(results: Mapping[str, Mapping[str, Any]], eval_dir: str, *,
                  step: int | None = None, tag: str = '') -> list[str]:
  """Writes one JSON per protocol and TensorBoard scalars (process 0 only).

  Args:
    results: ``evaluate``'s output (posteriors, if any, are not written).
    eval_dir: output folder (``WORKDIR/eval``).
    step: TensorBoard step (the checkpoint step); None: 0.
    tag: extra file-name part (e.g. ``'step1000'``).

  Returns:
    The JSON paths written (empty on other processes).
  """
  if jax.process_index() != 0:
    return []
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  os.makedirs(eval_dir, exist_ok=True)
  paths, scalars = [], {}
  for r in results.values():
    r = {k: v for k, v in r.items()
         if k not in ('posteriors', 'labels', 'index')}
    name = result_name(r)
    path = os.path.join(eval_dir, f'{name}{"_" + tag if tag else ""}.json')
    with open(path, 'w') as f:
      json.dump(r, f, indent=2, sort_keys=True)
    paths.append(path)
    for metric in ('top1_error', 'top5_error', 'top1_accuracy',
                   'top5_accuracy'):
      scalars[f'{name}/{metric}'] = r[metric]
  writer = metric_writers.create_default_writer(eval_dir, asynchronous=False)
  writer.write_scalars(int(step or 0), scalars)
  writer.flush()
  writer.close()
  return paths


# ----------------------------------------------------------------------------
# Checkpoints and the command line.


def load_member(path: str, *, checkpoint: str = 'latest',
                config_overrides: Mapping[str, Any] | None = None) -> Member:
  """Loads a training workdir or pretrained dir as an evaluation member.

  Args:
    path: a workdir (``config.json`` + ``checkpoints/``) or a pretrained dir.
    checkpoint: ``'latest'``, ``'best'`` or a step number.
    config_overrides: ``{'dotted.field': value}`` applied to the run config.

  Returns:
    The member, with the checkpoint's own normalisation.
  """
  from vgg_jax import checkpointing  # pylint: disable=g-import-not-at-top
  model, config, metadata = checkpointing.load_model(path,
                                                     checkpoint=checkpoint)
  apply_overrides(config, config_overrides or {})
  metadata = metadata or {}
  return Member(model, config, normalization=metadata.get('normalization'),
                mean_rgb=metadata.get('mean_rgb'), name=path,
                step=metadata.get('step'), metadata=metadata)


def parse_config_overrides(argv: Sequence[str]
                           ) -> tuple[dict[str, str], list[str]]:
  """Splits ``--config.a.b=value`` arguments off a command line.

  Args:
    argv: the command line.

  Returns:
    ``({'a.b': 'value'}, remaining argv)``; values stay text until
    ``apply_overrides`` parses them by the field's type.
  """
  overrides, rest = {}, []
  for arg in argv:
    if arg.startswith('--config.'):
      if '=' not in arg:
        raise ValueError(f'Bad override {arg!r}: use --config.field=value.')
      key, text = arg[len('--config.'):].split('=', 1)
      overrides[key] = text
    else:
      rest.append(arg)
  return overrides, rest


def _parse_like(text: str, current: Any, key: str) -> Any:
  """Parses command-line text as the type of the field's current value."""
  try:
    if isinstance(current, bool):
      if text.lower() in ('true', '1', 'yes'):
        return True
      if text.lower() in ('false', '0', 'no'):
        return False
      raise ValueError('expected true or false')
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, (tuple, list)):
      items = [t.strip() for t in text.strip('()[] ').split(',') if t.strip()]
      like = current[0] if current else None
      return type(current)(_parse_like(t, like, key) for t in items)
    if isinstance(current, str):
      return text
    try:  # a None field: whatever the text reads as
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return text
  except ValueError as e:
    raise ValueError(f'Bad value {text!r} for config field {key!r} '
                     f'(currently {current!r}): {e}') from e


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Sets ``{'a.b': value}`` fields of ``config`` in place.

  Text values (from the command line) are parsed by the field's current type:
  ``--config.input.scale_min=384``, ``--config.input.mean_rgb=1,2,3``,
  ``--config.data.manual_dir=/data``.

  Args:
    config: the config to change.
    overrides: dotted field names to values (text or already typed).

  Returns:
    ``config``.

  Raises:
    ValueError: an unknown field or a value of the wrong type.
  """
  for key, value in overrides.items():
    path = key.split('.')
    node = config
    for part in path[:-1]:
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise ValueError(f'Unknown config field {key!r} (no {part!r}).')
      node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or path[-1] not in node:
      raise ValueError(f'Unknown config field {key!r}.')
    current = node[path[-1]]
    if isinstance(value, str):
      value = _parse_like(value, current, key)
    try:
      node[path[-1]] = value
    except TypeError as e:
      raise ValueError(f'Bad value {value!r} for config field {key!r}: '
                       f'{e}') from e
  return config


def build_parser() -> argparse.ArgumentParser:
  """The command-line flags (``--config.field=value`` is handled apart)."""
  parser = argparse.ArgumentParser(
      prog='python -m vgg_jax.evaluate',
      description='Evaluate a run (or an ensemble) with the paper\'s test '
      'protocols. Extra --config.field=value arguments override the run\'s '
      'config (e.g. --config.data.manual_dir=/data).')
  parser.add_argument('--workdir', required=True,
                      help='Training workdir (or pretrained dir).')
  parser.add_argument('--checkpoint', default='latest',
                      help='latest, best or a step number.')
  parser.add_argument(
      '--protocol', default='dense',
      help='Protocol(s), comma-separated: ' + ', '.join(PROTOCOLS) +
      '. Several protocols share one pass over the data.')
  parser.add_argument(
      '--scales', default=None,
      help='Test scales Q, e.g. 256,384,512. Default: Q=S for fixed S, '
      '(S_min+S_max)/2 for jittered S; with --multi_scale {S-32,S,S+32} or '
      '{S_min,mid,S_max}.')
  parser.add_argument('--multi_scale', action='store_true',
                      help='Use the paper\'s multi-scale default scales.')
  parser.add_argument(
      '--ensemble', default=None,
      help='More workdirs, comma-separated, whose posteriors are averaged '
      'with --workdir\'s (the paper\'s Table 6).')
  parser.add_argument('--split', default=None,
                      help='Dataset split; default config.data.eval_split.')
  parser.add_argument('--batch_size', type=int, default=None,
                      help='Global eval batch; default '
                      'config.train.eval_batch_size.')
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m vgg_jax.evaluate --workdir=DIR ...``; returns the exit code.

  Args:
    argv: the arguments after the program name; None: ``sys.argv[1:]``.
  """
  overrides, rest = parse_config_overrides(
      sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(rest)
  logging.set_verbosity(logging.INFO)
  protocols = parse_protocols(args.protocol)
  scales = parse_scales(args.scales)
  paths = [args.workdir] + [
      p.strip() for p in (args.ensemble or '').split(',') if p.strip()]
  members = [load_member(p, checkpoint=args.checkpoint,
                         config_overrides=overrides) for p in paths]
  results = evaluate(members, protocols=protocols, scales=scales,
                     multi_scale=args.multi_scale, split=args.split,
                     batch_size=args.batch_size)
  step = members[0].step
  tag = f'step{step}' if step is not None else ''
  written = write_results(results, os.path.join(args.workdir, 'eval'),
                          step=step, tag=tag)
  if jax.process_index() == 0:
    print(f'Members: {", ".join(paths)} (checkpoint {args.checkpoint}, '
          f'step {step})')
    print(format_table(results))
    for path in written:
      print(f'Wrote {path}')
  return 0


def run_cli() -> None:
  """``main()`` with a one-line message instead of a traceback on bad input."""
  try:
    sys.exit(main())
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f'vgg_jax.evaluate: error: {e}')


if __name__ == '__main__':
  run_cli()
