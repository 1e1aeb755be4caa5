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

Which tensor goes where is ``vgg_jax/layouts.py``; reading and writing the
files is ``vgg_jax/weight_files.py``. Keras weights expect ``caffe_bgr``
input; ``--flip_to_rgb`` turns them into ``mean_rgb`` ones by reversing the
first conv's input channels, which is exact.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

from absl import flags
from absl import logging
from etils import epath
import jax.numpy as jnp
import numpy as np

from vgg_jax import cli
from vgg_jax import layouts
from vgg_jax import models
from vgg_jax import paths
from vgg_jax import preprocessing
from vgg_jax import pretrained
from vgg_jax import trees
from vgg_jax import weight_files

EXPORT_FORMATS = ('torchvision', 'timm', 'safetensors')
_FIRST_CONV = ('blocks', 0, 'convs', 0, 'kernel')


def read_class_names(path) -> list[str]:
  """One class name per non-empty line of a text file."""
  lines = epath.Path(path).read_text().splitlines()
  return [line.strip() for line in lines if line.strip()]


# -------------------------------------------------------------- importing ---


def _check_tensors(source: str, path, model_name: str,
                   found: Mapping[str, tuple[int, ...]], include_top: bool,
                   options: Mapping[str, Any]) -> None:
  """Raises ValueError, naming every misfit, unless ``found`` fits the model."""
  expected = layouts.expected_source_shapes(
      source, model_name, include_top=include_top, **options)
  head = layouts.head_keys(source, model_name)
  if not include_top:
    ignored = sorted(set(found) & head)
    if ignored:
      logging.info('include_top=False: ignoring head tensors %s.', ignored)
    found = {k: v for k, v in found.items() if k not in head}
  diffs = pretrained.describe_differences(expected, found)
  if not diffs:
    return
  hints = []
  guess = layouts.matching_flags(source, found, **options)
  if guess:
    hints.append(f'The file matches {guess}.')
  if include_top and not head & set(found):
    hints.append('It has no head tensors: for a trunk-only '
                 '(include_top=False) file pass --include_top=false.')
  raise ValueError(
      f'{path} does not match {source} {model_name} with options {options} '
      f'(include_top={include_top}):\n  ' + '\n  '.join(diffs) +
      ''.join('\n' + h for h in hints))


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


def _input_metadata(source: str, header: Mapping[str, str], *,
                    normalization: str | None, class_names, include_top: bool,
                    flip_to_rgb: bool) -> dict[str, Any]:
  """``normalization``, ``mean_rgb`` and ``class_names`` for the metadata."""
  recorded = _recorded_metadata(header)
  if normalization is None:
    normalization = recorded.get('normalization',
                                 layouts.SOURCE_NORMALIZATION[source])
  mean_rgb = recorded.get('mean_rgb') if normalization == 'mean_rgb' else None
  if class_names is None and recorded.get('class_names') and include_top:
    class_names = recorded['class_names']
  if flip_to_rgb:
    if normalization != 'caffe_bgr':
      raise ValueError(f'--flip_to_rgb needs caffe_bgr weights; these expect '
                       f'{normalization}.')
    normalization = 'mean_rgb'
    mean_rgb = tuple(reversed(preprocessing.CAFFE_MEAN_BGR))
  return dict(normalization=normalization, mean_rgb=mean_rgb,
              class_names=class_names)


def _relaid(source: str, path, tensors: Mapping[str, np.ndarray],
            metadata: Mapping[str, Any]) -> dict[tuple, np.ndarray]:
  """The file's tensors as ``{vgg_jax path: array}`` in the stored dtype."""
  model = dict(metadata['model'])
  name, include_top = model.pop('name'), metadata['include_top']
  param_dtype = jnp.dtype(model['param_dtype'])
  targets = pretrained.expected_shapes(name, include_top=include_top, **model)
  flat = {}
  for e in layouts.source_layout(source, name, include_top=include_top):
    if e.path is None:
      continue
    array = np.asarray(tensors[e.key])
    if not np.issubdtype(array.dtype, np.floating):
      raise ValueError(f'{path}: {e.key} has dtype {array.dtype}, expected '
                       'floating point.')
    array = layouts.to_vgg_jax(e.kind, array.astype(np.float32, copy=False),
                               targets[e.path][0])
    flat[e.path] = np.ascontiguousarray(array).astype(param_dtype, copy=False)
  return flat


def import_weights(source: str, path, model_name: str, *,
                   num_classes: int | None = None, include_top: bool = True,
                   class_names: Sequence[str] | None = None,
                   normalization: str | None = None, flip_to_rgb: bool = False,
                   **options) -> tuple[pretrained.PureDict, dict[str, Any]]:
  """Reads a published weights file into vgg_jax's layout.

  Args:
    source: one of ``layouts.SOURCES``.
    path: the weights file.
    model_name: the vgg_jax model (``layouts.SUPPORTED_MODELS[source]``).
    num_classes: FC-8 width; None: read from the file (or 1000 without a
      head).
    include_top: False to convert the conv trunk only (Keras
      ``include_top=False`` files); head tensors in the file are then
      ignored, and the head of a loaded model is random.
    class_names: one per class, or None.
    normalization: the input the weights expect; None: the source's
      (``layouts.SOURCE_NORMALIZATION``), or what a vgg_jax-exported file
      records.
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
  layouts.check_supported(source, model_name)
  tensors, header = weight_files.read_weights(path, keras=source == 'keras')
  found = {k: tuple(np.shape(v)) for k, v in tensors.items()}
  if num_classes is None:
    head_bias = found.get(layouts.HEAD_BIAS[source])
    num_classes = (head_bias[0] if include_top and head_bias and
                   len(head_bias) == 1 else 1000)
  options = {**options, 'num_classes': int(num_classes)}
  _check_tensors(source, path, model_name, found, include_top, options)
  metadata = pretrained.make_metadata(
      model_name, source=source, source_file=os.path.basename(os.fspath(path)),
      sha256=weight_files.file_sha256(path), include_top=include_top,
      **_input_metadata(source, header, normalization=normalization,
                        class_names=class_names, include_top=include_top,
                        flip_to_rgb=flip_to_rgb),
      **options)
  flat = _relaid(source, path, tensors, metadata)
  if flip_to_rgb:
    # caffe_bgr(x) = reverse_channels(x - mean_rgb), and a conv over
    # reversed input channels equals one with its kernel's input axis
    # reversed: exact, no retraining.
    flat[_FIRST_CONV] = np.ascontiguousarray(flat[_FIRST_CONV][:, :, ::-1, :])
  return trees.unflatten(flat), metadata


def convert_file(source: str, path, output, model_name: str, *,
                 overwrite: bool = False, **kwargs) -> epath.Path:
  """``import_weights`` then ``save_pretrained``; writes nothing on error.

  Args:
    source: one of ``layouts.SOURCES``.
    path: the weights file.
    output: the pretrained dir to write.
    model_name: the vgg_jax model.
    overwrite: replace an existing ``output``.
    **kwargs: as ``import_weights``.

  Returns:
    The pretrained dir (absolute).

  Raises:
    FileExistsError: ``output`` exists and ``overwrite`` is False (before
      the file is read).
  """
  with paths.replaced_atomically(output, overwrite=overwrite) as tmp:
    state, metadata = import_weights(source, path, model_name, **kwargs)
    pretrained.save_pretrained(tmp, state, metadata)
  return paths.absolute(output)


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
  flat = trees.flatten(state)
  if to == 'safetensors':
    return {trees.path_str(k): np.ascontiguousarray(v, np.float32)
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
  for e in layouts.source_layout(to, model['name'],
                                 include_top=metadata['include_top']):
    if e.path is None:
      out[e.key] = np.zeros((), np.int64)
    else:
      out[e.key] = np.ascontiguousarray(
          layouts.from_vgg_jax(e.kind, np.asarray(flat[e.path], np.float32)))
  return out


def export_weights(directory, output, *, to: str = 'torchvision',
                   overwrite: bool = False) -> epath.Path:
  """Writes a pretrained dir's weights as a torchvision/timm state dict.

  ``.safetensors`` output needs no torch; ``.pth``/``.pt`` output does. The
  safetensors header records the vgg_jax metadata under ``vgg_jax`` (input
  normalisation, class names), which ``import_weights`` reads back.

  Args:
    directory: a pretrained dir.
    output: the file to write; all or nothing.
    to: one of ``EXPORT_FORMATS``.
    overwrite: replace an existing file.

  Returns:
    The file's path (absolute).
  """
  with paths.replaced_atomically(output, overwrite=overwrite) as tmp:
    torch_pickle = weight_files.is_torch_pickle(
        output, allowed=to != 'safetensors')
    state, metadata = pretrained.load_state_dict(directory)
    tensors = export_state(state, metadata, to)
    if (metadata['normalization'] != 'imagenet_mean_std' and
        to != 'safetensors'):
      logging.warning('These weights expect %s input, not torchvision\'s '
                      'imagenet_mean_std; preprocess accordingly.',
                      metadata['normalization'])
    header = {'vgg_jax': json.dumps(metadata)}
    if to != 'safetensors':
      header['format'] = 'pt'
    weight_files.write_weights(tmp, tensors, torch_pickle=torch_pickle,
                               header=header)
  return paths.absolute(output)


def export_torchvision(directory, output, **kwargs) -> epath.Path:
  """``export_weights(..., to='torchvision')``."""
  return export_weights(directory, output, to='torchvision', **kwargs)


# -------------------------------------------------------------------- CLI ---


def define_flags(flag_values: flags.FlagValues) -> None:
  """Registers the program's flags.

  Args:
    flag_values: where to register them (``flags.FLAGS`` for the program).
  """
  fv = dict(flag_values=flag_values)
  default = models.ModelOptions()
  flags.DEFINE_enum('source', None, layouts.SOURCES,
                    'Import: the layout of --input.', **fv)
  flags.DEFINE_enum('to', None, EXPORT_FORMATS,
                    'Export: write the pretrained dir --input in this layout.',
                    **fv)
  flags.DEFINE_string('input', None, 'Weights file (import) or pretrained dir '
                      '(export).', **fv)
  flags.DEFINE_string('output', None, 'Pretrained dir (import) or file '
                      '(export: .safetensors, or .pth with torch).', **fv)
  flags.DEFINE_enum('model', None, models.MODEL_NAMES, 'Import: the model.',
                    **fv)
  flags.DEFINE_integer('num_classes', None, 'FC-8 width; default: from the '
                       'file (1000 without a head).', **fv)
  flags.DEFINE_float('width_multiplier', default.width_multiplier,
                     'Model width multiplier.', **fv)
  flags.DEFINE_integer('fc6_kernel', default.fc6_kernel, 'FC-6 kernel size.',
                       **fv)
  flags.DEFINE_float('dropout_rate', default.dropout_rate,
                     'Recorded dropout rate.', **fv)
  flags.DEFINE_enum('init', default.init, models.INIT_SCHEMES,
                    'Recorded init scheme (used for a random head).', **fv)
  flags.DEFINE_string('dtype', default.dtype, 'Recorded compute dtype.', **fv)
  flags.DEFINE_string('param_dtype', default.param_dtype,
                      'Stored parameter dtype.', **fv)
  flags.DEFINE_integer('in_channels', default.in_channels, 'Input channels.',
                       **fv)
  flags.DEFINE_boolean('include_top', True, 'Convert FC-6..FC-8; false for '
                       'trunk-only (Keras include_top=False) files.', **fv)
  flags.DEFINE_string('class_names', None, 'Text file, one class name a line.',
                      **fv)
  flags.DEFINE_enum('normalization', None, pretrained.NORMALIZATIONS,
                    'Override the input normalisation the weights expect.',
                    **fv)
  flags.DEFINE_boolean('flip_to_rgb', False, 'caffe_bgr weights: reverse the '
                       'first conv\'s input channels to take mean_rgb input.',
                       **fv)
  flags.DEFINE_boolean('overwrite', False, 'Replace an existing --output.',
                       **fv)


def _import(flag_values: flags.FlagValues) -> epath.Path:
  """The import half of ``main``: ``--source`` to a pretrained dir."""
  f = flag_values
  if not f.model:
    raise ValueError('--model is required with --source.')
  options = {name: f[name].value for name in models.MODEL_OPTIONS
             if name != 'num_classes'}
  class_names = read_class_names(f.class_names) if f.class_names else None
  return convert_file(
      f.source, f.input, f.output, f.model, overwrite=f.overwrite,
      num_classes=f.num_classes, include_top=f.include_top,
      class_names=class_names, normalization=f.normalization,
      flip_to_rgb=f.flip_to_rgb, **options)


def main(flag_values: flags.FlagValues) -> int:
  """Imports (``--source``) or exports (``--to``) one weights file.

  Args:
    flag_values: the parsed flags of ``define_flags``.

  Returns:
    0; user errors raise (``cli`` prints them on one line and exits 1).
  """
  f = flag_values
  if (f.source is None) == (f.to is None):
    raise ValueError('Pass exactly one of --source (import) and --to '
                     '(export).')
  if not f.input or not f.output:
    raise ValueError('--input and --output are required.')
  if f.source:
    out = _import(f)
  else:
    out = export_weights(f.input, f.output, to=f.to, overwrite=f.overwrite)
  logging.info('Wrote %s', out)
  print(out)
  return 0


if __name__ == '__main__':
  cli.run(define_flags, main)
