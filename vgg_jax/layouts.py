"""Where torchvision, timm and Keras keep each VGG tensor, and its layout.

A *source layout* is the list of tensors a published weights file of one
model holds, each with its name in the file, its place in the vgg_jax state
and how its array is laid out:

* torchvision ``vgg{11,13,16,19}[_bn]``: ``features.N.{weight,bias}`` conv
  (OIHW), BN ``features.N.{weight,bias,running_mean,running_var,
  num_batches_tracked}``, ``classifier.{0,3,6}`` linear (out, in). FC-6's
  input is the 512x7x7 map flattened C,H,W, so its (4096, 25088) weight is
  re-laid to the (7, 7, 512, 4096) conv kernel (reshape to (4096, 512, 7, 7),
  then OIHW -> HWIO).
* timm ``vgg*.tv_in1k``: the same ``features``; ``pre_logits.fc1`` a 7x7
  conv (4096, 512, 7, 7), ``pre_logits.fc2`` a 1x1 conv, ``head.fc`` linear.
* Keras ``applications.VGG16/VGG19``: ``block{b}_conv{i}`` (HWIO kernels),
  ``fc1``/``fc2``/``predictions`` dense (in, out); ``fc1``'s input is
  flattened H,W,C, so (25088, 4096) reshapes straight to (7, 7, 512, 4096).

torchvision and timm weights expect ``imagenet_mean_std`` input (RGB in
[0, 1], ImageNet mean/std); Keras weights expect ``caffe_bgr`` (BGR, 0-255,
minus the Caffe mean).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from vgg_jax import models
from vgg_jax import pretrained

SOURCES = ('torchvision', 'timm', 'keras')
SOURCE_NORMALIZATION = {'torchvision': 'imagenet_mean_std',
                        'timm': 'imagenet_mean_std', 'keras': 'caffe_bgr'}
# torchvision and timm ship configs A, B, D, E only (no LRN, no 1x1 convs).
_TORCH_NAMES = tuple(n + bn for n in ('vgg11', 'vgg13', 'vgg16', 'vgg19')
                     for bn in ('', '_bn'))
_KERAS_NAMES = ('vgg16', 'vgg19')
SUPPORTED_MODELS = {'torchvision': _TORCH_NAMES, 'timm': _TORCH_NAMES,
                    'keras': _KERAS_NAMES}
# The tensor whose length is the number of classes.
HEAD_BIAS = {'torchvision': 'classifier.6.bias', 'timm': 'head.fc.bias',
             'keras': 'predictions/bias'}


@dataclasses.dataclass(frozen=True)
class Entry:
  """One tensor of a source layout.

  Attributes:
    key: the tensor's name in the source file.
    path: where it goes in the vgg_jax state; None for tensors with no
      vgg_jax counterpart (BN ``num_batches_tracked``).
    kind: how the source lays the array out: ``oihw`` (PyTorch conv),
      ``linear`` (PyTorch linear (out, in); ``in`` flattened C,H,W),
      ``dense_hwc`` (Keras dense (in, out); ``in`` flattened H,W,C),
      ``same`` (as vgg_jax: HWIO kernels, vectors) or ``count``.
  """
  key: str
  path: tuple | None
  kind: str


def check_supported(source: str, name: str) -> None:
  """Raises ValueError unless ``source`` publishes model ``name``."""
  if source not in SUPPORTED_MODELS:
    raise ValueError(f'Unknown source {source!r}; valid: '
                     f'{", ".join(SUPPORTED_MODELS)}.')
  models.parse_name(name)
  if name not in SUPPORTED_MODELS[source]:
    raise ValueError(f'{source} has no {name!r} layout; it has '
                     f'{", ".join(SUPPORTED_MODELS[source])}.')


def _torch_features(name: str) -> list[Entry]:
  # Mirrors torchvision's make_layers: conv, [BN,] ReLU per layer and a
  # max-pool after each block, all in one Sequential, so indices skip the
  # parameter-free layers.
  arch, batch_norm = models.parse_name(name)
  entries, idx = [], 0
  for b, block in enumerate(arch.blocks):
    for i in range(len(block)):
      conv = ('blocks', b, 'convs', i)
      entries += [Entry(f'features.{idx}.weight', conv + ('kernel',), 'oihw'),
                  Entry(f'features.{idx}.bias', conv + ('bias',), 'same')]
      if batch_norm:
        norm, n = ('blocks', b, 'norms', i), idx + 1
        entries += [
            Entry(f'features.{n}.weight', norm + ('scale',), 'same'),
            Entry(f'features.{n}.bias', norm + ('bias',), 'same'),
            Entry(f'features.{n}.running_mean', norm + ('mean',), 'same'),
            Entry(f'features.{n}.running_var', norm + ('var',), 'same'),
            Entry(f'features.{n}.num_batches_tracked', None, 'count')]
      idx += 3 if batch_norm else 2
    idx += 1
  return entries


def _keras_features(name: str) -> list[Entry]:
  arch, _ = models.parse_name(name)
  entries = []
  for b, block in enumerate(arch.blocks):
    for i in range(len(block)):
      layer = f'block{b + 1}_conv{i + 1}'
      conv = ('blocks', b, 'convs', i)
      entries += [Entry(f'{layer}/kernel', conv + ('kernel',), 'same'),
                  Entry(f'{layer}/bias', conv + ('bias',), 'same')]
  return entries


def _pair(prefix: str, layer: str, kernel_kind: str, sep: str = '.',
          weight: str = 'weight') -> list[Entry]:
  return [Entry(f'{prefix}{sep}{weight}', (layer, 'kernel'), kernel_kind),
          Entry(f'{prefix}{sep}bias', (layer, 'bias'), 'same')]


def _head(source: str) -> list[Entry]:
  if source == 'keras':
    return (_pair('fc1', 'fc6', 'dense_hwc', '/', 'kernel') +
            _pair('fc2', 'fc7', 'dense_hwc', '/', 'kernel') +
            _pair('predictions', 'fc8', 'dense_hwc', '/', 'kernel'))
  if source == 'torchvision':
    return (_pair('classifier.0', 'fc6', 'linear') +
            _pair('classifier.3', 'fc7', 'linear') +
            _pair('classifier.6', 'fc8', 'linear'))
  return (_pair('pre_logits.fc1', 'fc6', 'oihw') +  # timm
          _pair('pre_logits.fc2', 'fc7', 'oihw') +
          _pair('head.fc', 'fc8', 'linear'))


def source_layout(source: str, name: str, *,
                  include_top: bool = True) -> list[Entry]:
  """The tensors of a model in a source's layout.

  Args:
    source: one of ``SOURCES``.
    name: a model name the source has (``SUPPORTED_MODELS[source]``).
    include_top: include FC-6..FC-8.

  Returns:
    The entries, trunk first.
  """
  check_supported(source, name)
  trunk = (_keras_features(name) if source == 'keras' else
           _torch_features(name))
  return trunk + _head(source) if include_top else trunk


def head_keys(source: str, name: str) -> set[str]:
  """The names of FC-6..FC-8's tensors in a source's file of ``name``."""
  return {e.key for e in source_layout(source, name)
          if e.path is not None and e.path[0] in pretrained.HEAD_LAYERS}


def _source_shape(kind: str, shape: Sequence[int]) -> tuple[int, ...]:
  if kind == 'same':
    return tuple(shape)
  if kind == 'count':
    return ()
  h, w, i, o = shape
  if kind == 'oihw':
    return (o, i, h, w)
  if kind == 'linear':
    return (o, i * h * w)
  if kind == 'dense_hwc':
    return (h * w * i, o)
  raise ValueError(f'Unknown layout kind {kind!r}.')


def to_vgg_jax(kind: str, array: np.ndarray,
               shape: Sequence[int]) -> np.ndarray:
  """A source tensor laid out as the vgg_jax array of ``shape``."""
  if kind == 'same':
    return array
  h, w, i, o = shape
  if kind == 'oihw':
    return array.transpose(2, 3, 1, 0)
  if kind == 'linear':  # (o, c*h*w) flattened C,H,W (docs/paper.md §6)
    return array.reshape(o, i, h, w).transpose(2, 3, 1, 0)
  if kind == 'dense_hwc':  # (h*w*c, o) flattened H,W,C
    return array.reshape(h, w, i, o)
  raise ValueError(f'Unknown layout kind {kind!r}.')


def from_vgg_jax(kind: str, array: np.ndarray) -> np.ndarray:
  """A vgg_jax array laid out as the source tensor (inverse of to_vgg_jax)."""
  if kind == 'same':
    return array
  if kind == 'oihw':
    return array.transpose(3, 2, 0, 1)
  if kind == 'linear':
    return array.transpose(3, 2, 0, 1).reshape(array.shape[3], -1)
  if kind == 'dense_hwc':
    return array.reshape(-1, array.shape[3])
  raise ValueError(f'Unknown layout kind {kind!r}.')


def expected_source_shapes(source: str, name: str, *, include_top: bool = True,
                           **options) -> dict[str, tuple[int, ...]]:
  """``{tensor name: shape}`` a source file of this model must hold.

  Args:
    source: one of ``SOURCES``.
    name: the model.
    include_top: include FC-6..FC-8.
    **options: ``create_model`` options (``num_classes``,
      ``width_multiplier``, ...).
  """
  targets = pretrained.expected_shapes(name, include_top=include_top,
                                       **options)
  return {e.key: _source_shape(e.kind, targets[e.path][0] if e.path else ())
          for e in source_layout(source, name, include_top=include_top)}


def matching_flags(source: str, found: dict[str, tuple[int, ...]],
                   **options) -> str | None:
  """The ``--model``/``--include_top`` flags under which ``found`` converts.

  Args:
    source: one of ``SOURCES``.
    found: ``{tensor name: shape}`` of a file.
    **options: ``create_model`` options.

  Returns:
    E.g. ``'--model=vgg11_bn --include_top=true'``, or None if no model of
    ``source`` fits.
  """
  for include_top in (True, False):
    for name in SUPPORTED_MODELS[source]:
      expected = expected_source_shapes(source, name, include_top=include_top,
                                        **options)
      if not pretrained.describe_differences(expected, found):
        return f'--model={name} --include_top={str(include_top).lower()}'
  return None
