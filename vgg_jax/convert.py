r"""Imports published VGG weights into vgg_jax and exports them back.

Import (writes a pretrained dir, see ``vgg_jax/pretrained.py``)::

    python -m vgg_jax.convert --source=torchvision --model=vgg16 \
        --input=vgg16-397923af.pth --output=weights/vgg16_tv
    python -m vgg_jax.convert --source=timm --model=vgg16_bn \
        --input=model.safetensors --output=weights/vgg16_bn_timm
    python -m vgg_jax.convert --source=keras --model=vgg16 \
        --input=vgg16_weights_tf_dim_ordering_tf_kernels.h5 \
        --output=weights/vgg16_keras

Export (no torch needed for ``.safetensors``)::

    python -m vgg_jax.convert --to=torchvision --input=weights/vgg16_tv \
        --output=vgg16.safetensors

Layouts:

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
  Read from legacy ``.h5`` (the published files) and Keras 3 ``.weights.h5``.

torchvision and timm weights expect ``imagenet_mean_std`` input (RGB in
[0, 1], ImageNet mean/std); Keras weights expect ``caffe_bgr`` (BGR, 0-255,
minus the Caffe mean). ``--flip_to_rgb`` turns Caffe-BGR weights into
``mean_rgb`` ones by reversing the first conv's input channels, which is
exact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import uuid
from typing import Any, Mapping, Sequence

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax.numpy as jnp
import numpy as np

from vgg_jax import models
from vgg_jax import preprocessing
from vgg_jax import pretrained

SOURCES = ('torchvision', 'timm', 'keras')
EXPORT_FORMATS = ('torchvision', 'timm', 'safetensors')
SOURCE_NORMALIZATION = {'torchvision': 'imagenet_mean_std',
                        'timm': 'imagenet_mean_std', 'keras': 'caffe_bgr'}
# torchvision and timm ship configs A, B, D, E only (no LRN, no 1x1 convs).
_TORCH_NAMES = tuple(n + bn for n in ('vgg11', 'vgg13', 'vgg16', 'vgg19')
                     for bn in ('', '_bn'))
_KERAS_NAMES = ('vgg16', 'vgg19')
SUPPORTED_MODELS = {'torchvision': _TORCH_NAMES, 'timm': _TORCH_NAMES,
                    'keras': _KERAS_NAMES}
# The tensor whose length is the number of classes.
_HEAD_BIAS = {'torchvision': 'classifier.6.bias', 'timm': 'head.fc.bias',
              'keras': 'predictions/bias'}
_TORCH_PICKLE_SUFFIXES = ('.pth', '.pt', '.bin', '.ckpt')


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


def _check_supported(source: str, name: str):
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


def _pair(prefix: str, layer: str, kernel_kind: str, sep: str = '.',
          weight: str = 'weight') -> list[Entry]:
  return [Entry(f'{prefix}{sep}{weight}', (layer, 'kernel'), kernel_kind),
          Entry(f'{prefix}{sep}bias', (layer, 'bias'), 'same')]


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
  _check_supported(source, name)
  if source == 'keras':
    arch, _ = models.parse_name(name)
    entries = []
    for b, block in enumerate(arch.blocks):
      for i in range(len(block)):
        layer = f'block{b + 1}_conv{i + 1}'
        conv = ('blocks', b, 'convs', i)
        entries += [Entry(f'{layer}/kernel', conv + ('kernel',), 'same'),
                    Entry(f'{layer}/bias', conv + ('bias',), 'same')]
    head = (_pair('fc1', 'fc6', 'dense_hwc', '/', 'kernel') +
            _pair('fc2', 'fc7', 'dense_hwc', '/', 'kernel') +
            _pair('predictions', 'fc8', 'dense_hwc', '/', 'kernel'))
  elif source == 'torchvision':
    entries = _torch_features(name)
    head = (_pair('classifier.0', 'fc6', 'linear') +
            _pair('classifier.3', 'fc7', 'linear') +
            _pair('classifier.6', 'fc8', 'linear'))
  else:  # timm
    entries = _torch_features(name)
    head = (_pair('pre_logits.fc1', 'fc6', 'oihw') +
            _pair('pre_logits.fc2', 'fc7', 'oihw') +
            _pair('head.fc', 'fc8', 'linear'))
  return entries + head if include_top else entries


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
  if kind == 'linear':  # (o, c*h*w) flattened C,H,W (PAPER.md §5)
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


# ---------------------------------------------------------------- reading ---


def file_sha256(path) -> str:
  """SHA-256 of a file, streamed."""
  digest = hashlib.sha256()
  with epath.Path(path).open('rb') as f:
    for chunk in iter(lambda: f.read(1 << 24), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _strip_module_prefix(tensors: dict[str, Any]) -> dict[str, Any]:
  # nn.DataParallel / DDP checkpoints prefix every key with "module.".
  if tensors and all(k.startswith('module.') for k in tensors):
    return {k[len('module.'):]: v for k, v in tensors.items()}
  return tensors


def _read_torch_pickle(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f'Reading {path} (a PyTorch pickle) needs torch, which is not '
        'installed. Install it (pip install torch), or convert the file to '
        'safetensors where torch is available: safetensors.torch.save_file('
        'torch.load(path), "weights.safetensors").') from e
  obj = torch.load(path, map_location='cpu', weights_only=True)
  for wrapper in ('state_dict', 'model'):
    if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
      obj = obj[wrapper]
  if not isinstance(obj, Mapping):
    raise ValueError(f'{path} holds a {type(obj).__name__}, not a state dict.')
  out = {}
  for k, v in obj.items():
    if not hasattr(v, 'numpy'):
      raise ValueError(f'{path}: entry {k!r} is a {type(v).__name__}, not a '
                       'tensor.')
    v = v.detach().cpu()
    out[k] = (v.float() if v.is_floating_point() else v).numpy()
  return out


def _read_safetensors(path: str) -> tuple[dict[str, np.ndarray],
                                          dict[str, str]]:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  with safe_open(path, framework='numpy') as f:
    header = f.metadata() or {}
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  return tensors, header


def _h5_attr_list(group, name: str) -> list[str]:
  # Keras splits long attributes into name0, name1, ... (HDF5 header limit).
  if name in group.attrs:
    values = list(group.attrs[name])
  else:
    values, i = [], 0
    while f'{name}{i}' in group.attrs:
      values.extend(group.attrs[f'{name}{i}'])
      i += 1
  return [v.decode('utf8') if isinstance(v, bytes) else str(v) for v in values]


def _h5_array(dataset) -> np.ndarray:
  if dataset.attrs.get('dtype') == 'bfloat16':  # Keras 3 stores bf16 so
    return np.asarray(dataset).view(jnp.bfloat16).astype(np.float32)
  return np.asarray(dataset)


def _name_layer_weights(layer: str, arrays: list[np.ndarray],
                        out: dict[str, np.ndarray]):
  # Keras writes kernel then bias, but the published VGG files use Keras 1
  # names (block1_conv1_W_1:0), so go by rank, not by name.
  if (len(arrays) == 2 and arrays[0].ndim >= 2 and arrays[1].ndim == 1):
    out[f'{layer}/kernel'], out[f'{layer}/bias'] = arrays
  else:
    for j, a in enumerate(arrays):
      out[f'{layer}/{j}'] = a


def _read_keras_h5(path: str) -> dict[str, np.ndarray]:
  """Keras weights, as ``{'<layer>/kernel': ..., '<layer>/bias': ...}``."""
  import h5py  # pylint: disable=g-import-not-at-top
  out: dict[str, np.ndarray] = {}
  with h5py.File(path, 'r') as f:
    group = f['model_weights'] if 'model_weights' in f else f
    if _h5_attr_list(group, 'layer_names'):  # legacy Keras 2 / tf.keras
      for layer in _h5_attr_list(group, 'layer_names'):
        g = group[layer]
        arrays = [_h5_array(g[w]) for w in _h5_attr_list(g, 'weight_names')]
        if arrays:
          _name_layer_weights(layer, arrays, out)
    elif 'layers' in f:  # Keras 3 .weights.h5: layers/<attr>/vars/<i>
      unnamed = []

      def visit(name, obj):
        if (isinstance(obj, h5py.Group) and name.endswith('/vars') and
            len(obj)):
          layer = obj.attrs.get('name')
          if layer is None:
            unnamed.append(name)
            return
          layer = layer.decode() if isinstance(layer, bytes) else str(layer)
          keys = sorted(obj.keys(), key=int)
          _name_layer_weights(layer, [_h5_array(obj[k]) for k in keys], out)
      f['layers'].visititems(visit)
      if unnamed:
        raise ValueError(
            f'{path}: the groups {", ".join(unnamed[:5])} carry no layer '
            'name (an older Keras 3 wrote this file). Load it into '
            'keras.applications.VGG16/VGG19 and save it again with a recent '
            'Keras, or as a legacy .h5.')
    else:
      raise ValueError(f'{path} is neither a legacy Keras .h5 weights file '
                       '(no layer_names attribute) nor a Keras 3 '
                       '.weights.h5 (no layers/ group).')
  return out


def read_source_file(source: str, path) -> tuple[dict[str, np.ndarray],
                                                 dict[str, str]]:
  """The tensors of a source file, and its safetensors header if any.

  Args:
    source: one of ``SOURCES``.
    path: ``.safetensors`` or a PyTorch pickle (``.pth``, ``.pt``, ``.bin``)
      for torchvision/timm; ``.h5`` / ``.weights.h5`` for Keras.

  Returns:
    ``({name: array}, header)``; ``header`` is the safetensors metadata (empty
    for other formats).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No such file: {path}')
  lower = path.lower()
  if source == 'keras':
    if not lower.endswith('.h5'):
      raise ValueError(f'Keras weights must be .h5 or .weights.h5, got '
                       f'{path}.')
    return _read_keras_h5(path), {}
  if source not in SOURCES:
    raise ValueError(f'Unknown source {source!r}; valid: '
                     f'{", ".join(SOURCES)}.')
  if lower.endswith('.safetensors'):
    tensors, header = _read_safetensors(path)
  elif lower.endswith(_TORCH_PICKLE_SUFFIXES):
    tensors, header = _read_torch_pickle(path), {}
  else:
    raise ValueError(f'Cannot tell the format of {path}: expected '
                     '.safetensors or one of '
                     f'{", ".join(_TORCH_PICKLE_SUFFIXES)}.')
  return _strip_module_prefix(tensors), header


# -------------------------------------------------------------- importing ---


def _guess_flags(source: str, found: Mapping[str, tuple],
                 options: Mapping[str, Any]) -> str | None:
  """The --model/--include_top flags under which ``found`` would convert."""
  for include_top in (True, False):
    for name in SUPPORTED_MODELS[source]:
      expected = expected_source_shapes(source, name, include_top=include_top,
                                        **options)
      if not pretrained.describe_differences(expected, found):
        return f'--model={name} --include_top={str(include_top).lower()}'
  return None


def read_class_names(path) -> list[str]:
  """One class name per non-empty line of a text file."""
  lines = epath.Path(path).read_text().splitlines()
  return [line.strip() for line in lines if line.strip()]


def import_weights(source: str, path, model_name: str, *,
                   num_classes: int | None = None, include_top: bool = True,
                   class_names: Sequence[str] | None = None,
                   normalization: str | None = None, flip_to_rgb: bool = False,
                   **options) -> tuple[pretrained.PureDict, dict[str, Any]]:
  """Reads a published weights file into vgg_jax's layout.

  Args:
    source: one of ``SOURCES``.
    path: the weights file.
    model_name: the vgg_jax model (``SUPPORTED_MODELS[source]``).
    num_classes: FC-8 width; None: read from the file (or 1000 without a
      head).
    include_top: False to convert the conv trunk only (Keras
      ``include_top=False`` files); head tensors in the file are then
      ignored, and the head of a loaded model is random.
    class_names: one per class, or None.
    normalization: the input the weights expect; None: the source's
      (``SOURCE_NORMALIZATION``), or what a vgg_jax-exported file records.
    flip_to_rgb: for ``caffe_bgr`` weights, reverse the first conv's input
      channels so the weights take RGB input normalised by ``mean_rgb``
      with the Caffe mean (same outputs).
    **options: other ``create_model`` options (``width_multiplier``,
      ``fc6_kernel``, ``param_dtype``, ...), recorded in the metadata.

  Returns:
    ``(state, metadata)``: the nested dict of NumPy arrays (``nnx`` pure-dict
    layout) and the metadata for ``pretrained.save_pretrained``.

  Raises:
    ValueError: the file does not match the model (the message lists the
      missing, unexpected and wrongly shaped tensors), or bad options.
  """
  _check_supported(source, model_name)
  tensors, header = read_source_file(source, path)
  found = {k: tuple(np.shape(v)) for k, v in tensors.items()}
  if num_classes is None:
    head_bias = found.get(_HEAD_BIAS[source])
    num_classes = (head_bias[0] if include_top and head_bias and
                   len(head_bias) == 1 else 1000)
  options = {**options, 'num_classes': int(num_classes)}
  expected = expected_source_shapes(source, model_name,
                                    include_top=include_top, **options)
  ignored = []
  if not include_top:
    head_keys = set(expected_source_shapes(source, model_name, **options))
    ignored = sorted(k for k in found if k in head_keys - set(expected))
    found = {k: v for k, v in found.items() if k not in ignored}
  diffs = pretrained.describe_differences(expected, found)
  if diffs:
    hints = []
    guess = _guess_flags(source, found, options)
    if guess:
      hints.append(f'The file matches {guess}.')
    head = {k for k in expected_source_shapes(source, model_name, **options)
            if k not in expected_source_shapes(
                source, model_name, include_top=False, **options)}
    if include_top and not head & set(found):
      hints.append('It has no head tensors: for a trunk-only '
                   '(include_top=False) file pass --include_top=false.')
    raise ValueError(
        f'{path} does not match {source} {model_name} with options {options} '
        f'(include_top={include_top}):\n  ' + '\n  '.join(diffs) +
        ''.join('\n' + h for h in hints))
  if ignored:
    logging.info('include_top=False: ignoring head tensors %s.', ignored)

  recorded = _recorded_metadata(header)
  if normalization is None:
    normalization = recorded.get('normalization',
                                 SOURCE_NORMALIZATION[source])
  mean_rgb = recorded.get('mean_rgb') if normalization == 'mean_rgb' else None
  if class_names is None and recorded.get('class_names') and include_top:
    class_names = recorded['class_names']
  if flip_to_rgb:
    if normalization != 'caffe_bgr':
      raise ValueError(f'--flip_to_rgb needs caffe_bgr weights; these expect '
                       f'{normalization}.')
    normalization = 'mean_rgb'
    mean_rgb = tuple(reversed(preprocessing.CAFFE_MEAN_BGR))
  metadata = pretrained.make_metadata(
      model_name, normalization=normalization, mean_rgb=mean_rgb,
      class_names=class_names, source=source,
      source_file=os.path.basename(os.fspath(path)),
      sha256=file_sha256(path), include_top=include_top, **options)

  param_dtype = jnp.dtype(metadata['model']['param_dtype'])
  targets = pretrained.expected_shapes(model_name, include_top=include_top,
                                       **options)
  flat = {}
  for e in source_layout(source, model_name, include_top=include_top):
    if e.path is None:
      continue
    array = np.asarray(tensors[e.key])
    if not np.issubdtype(array.dtype, np.floating):
      raise ValueError(f'{path}: {e.key} has dtype {array.dtype}, expected '
                       'floating point.')
    array = to_vgg_jax(e.kind, array.astype(np.float32, copy=False),
                       targets[e.path][0])
    flat[e.path] = np.ascontiguousarray(array).astype(param_dtype, copy=False)
  if flip_to_rgb:
    # caffe_bgr(x) = reverse_channels(x - mean_rgb), and a conv over
    # reversed input channels equals one with its kernel's input axis
    # reversed: exact, no retraining.
    first = ('blocks', 0, 'convs', 0, 'kernel')
    flat[first] = np.ascontiguousarray(flat[first][:, :, ::-1, :])
  return pretrained.unflatten(flat), metadata


def _recorded_metadata(header: Mapping[str, str]) -> dict[str, Any]:
  # Files written by export_weights carry vgg_jax's metadata; honour its
  # normalisation and class names on the way back in.
  if 'vgg_jax' not in header:
    return {}
  try:
    recorded = json.loads(header['vgg_jax'])
  except ValueError:
    logging.warning('Ignoring unreadable vgg_jax metadata in the file header.')
    return {}
  logging.info('The file records vgg_jax metadata (normalization %s).',
               recorded.get('normalization'))
  return recorded


def convert_file(source: str, path, output, model_name: str, *,
                 overwrite: bool = False, **kwargs) -> epath.Path:
  """``import_weights`` then ``save_pretrained``; writes nothing on error.

  Args:
    source: one of ``SOURCES``.
    path: the weights file.
    output: the pretrained dir to write.
    model_name: the vgg_jax model.
    overwrite: replace an existing ``output``.
    **kwargs: as ``import_weights``.

  Returns:
    The pretrained dir.
  """
  output = epath.Path(output)
  if output.exists() and not overwrite:
    raise FileExistsError(f'{output} exists; pass --overwrite to replace it.')
  state, metadata = import_weights(source, path, model_name, **kwargs)
  return pretrained.save_pretrained(output, state, metadata,
                                    overwrite=overwrite)


# -------------------------------------------------------------- exporting ---


def export_state(state: Mapping[Any, Any], metadata: Mapping[str, Any],
                 to: str = 'torchvision') -> dict[str, np.ndarray]:
  """A vgg_jax state as a flat ``{name: array}`` in another layout.

  Args:
    state: nested dict of arrays (``pretrained.load_state_dict``).
    metadata: its metadata.
    to: one of ``EXPORT_FORMATS``: ``torchvision`` / ``timm`` state dicts,
      or ``safetensors`` (vgg_jax's own layout, ``blocks.0.convs.0.kernel``).

  Returns:
    float32 arrays (BN ``num_batches_tracked`` int64 zeros).
  """
  flat = pretrained.flat_state(state)
  if to == 'safetensors':
    return {pretrained.path_str(k): np.ascontiguousarray(v, np.float32)
            for k, v in flat.items()}
  if to not in ('torchvision', 'timm'):
    raise ValueError(f'Unknown export format {to!r}; valid: '
                     f'{", ".join(EXPORT_FORMATS)}.')
  model = metadata['model']
  if model['width_multiplier'] != 1.0 or model['fc6_kernel'] != 7:
    logging.warning('width_multiplier=%s, fc6_kernel=%s: torchvision/timm '
                    'VGGs expect 1.0 and 7; the file follows their naming '
                    'but will not load into their stock models.',
                    model['width_multiplier'], model['fc6_kernel'])
  out = {}
  for e in source_layout(to, model['name'],
                         include_top=metadata['include_top']):
    if e.path is None:
      out[e.key] = np.zeros((), np.int64)
    else:
      out[e.key] = np.ascontiguousarray(
          from_vgg_jax(e.kind, np.asarray(flat[e.path], np.float32)))
  return out


def export_weights(directory, output, *, to: str = 'torchvision',
                   overwrite: bool = False) -> epath.Path:
  """Writes a pretrained dir's weights as a torchvision/timm state dict.

  ``.safetensors`` output needs no torch; ``.pth``/``.pt`` output does. The
  safetensors header records the vgg_jax metadata under ``vgg_jax`` (input
  normalisation, class names), which ``import_weights`` reads back.

  Args:
    directory: a pretrained dir.
    output: the file to write.
    to: one of ``EXPORT_FORMATS``.
    overwrite: replace an existing file.

  Returns:
    The file's path.
  """
  output = epath.Path(output)
  if output.exists() and not overwrite:
    raise FileExistsError(f'{output} exists; pass --overwrite to replace it.')
  suffix = output.suffix.lower()
  if suffix != '.safetensors' and (to == 'safetensors' or
                                   suffix not in _TORCH_PICKLE_SUFFIXES):
    raise ValueError(f'Output {output} must end in .safetensors' + (
        '' if to == 'safetensors' else
        f' or one of {", ".join(_TORCH_PICKLE_SUFFIXES)} (needs torch)') + '.')
  state, metadata = pretrained.load_state_dict(directory)
  tensors = export_state(state, metadata, to)
  if metadata['normalization'] != 'imagenet_mean_std' and to != 'safetensors':
    logging.warning('These weights expect %s input, not torchvision\'s '
                    'imagenet_mean_std; preprocess accordingly.',
                    metadata['normalization'])
  output.parent.mkdir(parents=True, exist_ok=True)
  tmp = output.parent / f'.{output.name}.tmp-{uuid.uuid4().hex[:8]}'
  try:
    if suffix == '.safetensors':
      # pylint: disable-next=g-import-not-at-top
      from safetensors.numpy import save_file
      header = {'vgg_jax': json.dumps(metadata)}
      if to != 'safetensors':
        header['format'] = 'pt'
      save_file(tensors, os.fspath(tmp), metadata=header)
    else:
      try:
        import torch  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ImportError(f'Writing {output} needs torch, which is not '
                          'installed; write .safetensors instead.') from e
      torch.save({k: torch.from_numpy(v) for k, v in tensors.items()},
                 os.fspath(tmp))
    tmp.rename(output)
  finally:
    if tmp.exists():
      tmp.unlink()
  return output


def export_torchvision(directory, output, **kwargs) -> epath.Path:
  """``export_weights(..., to='torchvision')``."""
  return export_weights(directory, output, to='torchvision', **kwargs)


# -------------------------------------------------------------------- CLI ---

def define_flags() -> None:
  """Registers the CLI flags.

  Called only when the module runs as a program, so that importing it next
  to other absl programs cannot clash over flag names.
  """
  flags.DEFINE_enum('source', None, SOURCES,
                    'Import: the layout of --input.')
  flags.DEFINE_enum('to', None, EXPORT_FORMATS,
                    'Export: write the pretrained dir --input in this layout.')
  flags.DEFINE_string('input', None, 'Weights file (import) or pretrained dir '
                      '(export).')
  flags.DEFINE_string('output', None, 'Pretrained dir (import) or file '
                      '(export: .safetensors, or .pth with torch).')
  flags.DEFINE_enum('model', None, models.MODEL_NAMES, 'Import: the model.')
  flags.DEFINE_integer('num_classes', None, 'FC-8 width; default: from the '
                       'file (1000 without a head).')
  flags.DEFINE_float('width_multiplier', 1.0, 'Model width multiplier.')
  flags.DEFINE_integer('fc6_kernel', 7, 'FC-6 kernel size.')
  flags.DEFINE_float('dropout_rate', 0.5, 'Recorded dropout rate.')
  flags.DEFINE_enum('init', 'normal', models.INIT_SCHEMES,
                    'Recorded init scheme (used for a random head).')
  flags.DEFINE_string('dtype', 'float32', 'Recorded compute dtype.')
  flags.DEFINE_string('param_dtype', 'float32', 'Stored parameter dtype.')
  flags.DEFINE_integer('in_channels', 3, 'Input channels.')
  flags.DEFINE_boolean('include_top', True, 'Convert FC-6..FC-8; false for '
                       'trunk-only (Keras include_top=False) files.')
  flags.DEFINE_string('class_names', None, 'Text file, one class name a line.')
  flags.DEFINE_enum('normalization', None, pretrained.NORMALIZATIONS,
                    'Override the input normalisation the weights expect.')
  flags.DEFINE_boolean('flip_to_rgb', False, 'caffe_bgr weights: reverse the '
                       'first conv\'s input channels to take mean_rgb input.')
  flags.DEFINE_boolean('overwrite', False, 'Replace an existing --output.')


FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if (FLAGS.source is None) == (FLAGS.to is None):
    raise app.UsageError('Pass exactly one of --source (import) and --to '
                         '(export).')
  if not FLAGS.input or not FLAGS.output:
    raise app.UsageError('--input and --output are required.')
  try:
    if FLAGS.source:
      if not FLAGS.model:
        raise app.UsageError('--model is required with --source.')
      class_names = (read_class_names(FLAGS.class_names)
                     if FLAGS.class_names else None)
      out = convert_file(
          FLAGS.source, FLAGS.input, FLAGS.output, FLAGS.model,
          overwrite=FLAGS.overwrite, num_classes=FLAGS.num_classes,
          include_top=FLAGS.include_top, class_names=class_names,
          normalization=FLAGS.normalization, flip_to_rgb=FLAGS.flip_to_rgb,
          width_multiplier=FLAGS.width_multiplier,
          fc6_kernel=FLAGS.fc6_kernel, dropout_rate=FLAGS.dropout_rate,
          init=FLAGS.init, dtype=FLAGS.dtype, param_dtype=FLAGS.param_dtype,
          in_channels=FLAGS.in_channels)
    else:
      out = export_weights(FLAGS.input, FLAGS.output, to=FLAGS.to,
                           overwrite=FLAGS.overwrite)
  except (ValueError, FileExistsError, FileNotFoundError, ImportError) as e:
    print(f'Error: {e}', file=sys.stderr)
    sys.exit(1)
  logging.info('Wrote %s', out)
  print(out)


if __name__ == '__main__':
  define_flags()
  app.run(main)
