"""Pretrained-weights directories: weights plus what they expect as input.

A *pretrained dir* holds a VGG's weights without any training state::

    DIR/metadata.json   what the weights are and what input they expect
    DIR/state/          Orbax checkpoint of the nested dict of Params and
                        BatchStats (``nnx.to_pure_dict`` layout)

``metadata.json``::

    {"format": "vgg_jax.pretrained/1",
     "model": {"name": "vgg16", "num_classes": 1000, "dropout_rate": 0.5,
               "width_multiplier": 1.0, "fc6_kernel": 7, "init": "normal",
               "dtype": "float32", "param_dtype": "float32", "in_channels": 3},
     "class_names": [...] or null,
     "normalization": "mean_rgb" | "imagenet_mean_std" | "caffe_bgr",
     "mean_rgb": [r, g, b] (0-255, for "mean_rgb") or null,
     "channel_order": "RGB" | "BGR",
     "source": "torchvision" | "timm" | "keras" | "vgg_jax" | ...,
     "source_file": file name or null, "sha256": its hash or null,
     "include_top": true | false}

``include_top: false`` dirs hold the conv trunk only (``blocks``); a model
loaded from one has a randomly initialised head (FC-6..FC-8), so only its
``features(x)['pool1'..'pool5']`` (and trunk layers) are meaningful.

Example::

    model, meta = load_pretrained('weights/vgg16_tv')
    x = preprocessing.normalize(images, meta['normalization'],
                                mean_rgb=meta['mean_rgb'])
    logits = model(x)
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
from typing import Any, Mapping

from etils import epath
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from vgg_jax import models
from vgg_jax import paths
from vgg_jax import preprocessing
from vgg_jax import trees

FORMAT = 'vgg_jax.pretrained/1'
METADATA_FILE = 'metadata.json'
STATE_DIR = 'state'
NORMALIZATIONS = preprocessing.NORMALIZATIONS
HEAD_LAYERS = ('fc6', 'fc7', 'fc8')

PureDict = dict[Any, Any]


def _weights_filter():
  # What a pretrained dir stores: no RNG state, no optimiser state.
  return nnx.Any(nnx.Param, nnx.BatchStat)


def model_options(metadata: Mapping[str, Any]) -> dict[str, Any]:
  """The ``create_model`` keyword options recorded in ``metadata['model']``."""
  return {k: v for k, v in metadata['model'].items() if k != 'name'}


def expected_shapes(name: str, *, include_top: bool = True,
                    **options) -> dict[tuple, tuple[tuple[int, ...], Any]]:
  """Shapes and dtypes of the weights a pretrained dir must hold.

  Args:
    name: one of ``models.MODEL_NAMES``.
    include_top: whether the head (FC-6..FC-8) is included.
    **options: ``create_model`` options.

  Returns:
    ``{path tuple: (shape, dtype)}`` for every Param and BatchStat, computed
    without allocating the model.
  """
  return dict(_expected_shapes(name, include_top,
                               tuple(sorted(options.items()))))


@functools.lru_cache(maxsize=32)
def _expected_shapes(name: str, include_top: bool, options: tuple):
  abstract = models.abstract_model(name, **dict(options))
  state = nnx.state(abstract, _weights_filter())
  out = {}
  for path, var in nnx.to_flat_state(state):
    if not include_top and path[0] in HEAD_LAYERS:
      continue
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    out[tuple(path)] = (tuple(value.shape), np.dtype(value.dtype))
  return out


def _natural_key(key) -> list:
  # 'features.8' before 'features.11'.
  return [(0, int(t), '') if t.isdigit() else (1, 0, t)
          for t in re.split(r'(\d+)', str(key))]


def describe_differences(expected: Mapping[Any, tuple[int, ...]],
                         found: Mapping[Any, tuple[int, ...]],
                         limit: int = 30) -> list[str]:
  """Human-readable differences between two ``{key: shape}`` maps.

  Args:
    expected: what the model needs.
    found: what the file holds.
    limit: most entries listed per kind of difference.

  Returns:
    Lines such as ``'missing: features.0.weight (64, 3, 3, 3)'``; empty when
    the two agree.
  """
  def fmt(kind, keys, show):
    keys = sorted(keys, key=_natural_key)
    lines = [f'{kind}: {show(k)}' for k in keys[:limit]]
    if len(keys) > limit:
      lines.append(f'{kind}: ... and {len(keys) - limit} more')
    return lines
  missing = set(expected) - set(found)
  extra = set(found) - set(expected)
  wrong = {k for k in set(expected) & set(found)
           if tuple(expected[k]) != tuple(found[k])}
  return (fmt('missing', missing, lambda k: f'{k} {tuple(expected[k])}') +
          fmt('unexpected', extra, lambda k: f'{k} {tuple(found[k])}') +
          fmt('wrong shape', wrong, lambda k: f'{k} is {tuple(found[k])}, '
              f'expected {tuple(expected[k])}'))


def make_metadata(name: str, *, normalization: str,
                  mean_rgb=None, class_names=None, source: str = 'vgg_jax',
                  source_file: str | None = None, sha256: str | None = None,
                  include_top: bool = True, **options) -> dict[str, Any]:
  """Builds and checks a ``metadata.json`` dict.

  Args:
    name: one of ``models.MODEL_NAMES``.
    normalization: one of ``NORMALIZATIONS``: the input the weights expect.
    mean_rgb: the 0-255 RGB mean for ``'mean_rgb'``; default: the
      ILSVRC-2012 mean of the base config. Must be None for the others.
    class_names: one name per class, or None.
    source: where the weights come from (``'torchvision'``, ...).
    source_file: the file converted, if any.
    sha256: its SHA-256.
    include_top: False for trunk-only weights.
    **options: ``create_model`` options (defaults filled in).

  Returns:
    The metadata dict.

  Raises:
    ValueError: bad name, option, normalization or class-name count.
  """
  models.parse_name(name)
  full = models.ModelOptions.create(**options).as_dict()
  if normalization not in NORMALIZATIONS:
    raise ValueError(f'Unknown normalization {normalization!r}; valid: '
                     f'{", ".join(NORMALIZATIONS)}.')
  if normalization == 'mean_rgb':
    if mean_rgb is None:
      mean_rgb = preprocessing.IMAGENET_MEAN_RGB
    mean_rgb = [float(v) for v in mean_rgb]
    if len(mean_rgb) != 3:
      raise ValueError(f'mean_rgb must have 3 values, got {mean_rgb}.')
  elif mean_rgb is not None:
    raise ValueError(f'mean_rgb is only used with normalization "mean_rgb", '
                     f'not {normalization!r}.')
  if class_names is not None:
    class_names = [str(c) for c in class_names]
    if len(class_names) != full['num_classes']:
      raise ValueError(f'{len(class_names)} class names for '
                       f'{full["num_classes"]} classes.')
  return {
      'format': FORMAT,
      'model': {'name': name, **full},
      'class_names': class_names,
      'normalization': normalization,
      'mean_rgb': mean_rgb,
      'channel_order': 'BGR' if normalization == 'caffe_bgr' else 'RGB',
      'source': source,
      'source_file': source_file,
      'sha256': sha256,
      'include_top': bool(include_top),
  }


def _pure_weights(model_or_state) -> dict[tuple, np.ndarray]:
  if isinstance(model_or_state, nnx.Module):
    flat = trees.flatten(nnx.to_pure_dict(
        nnx.state(model_or_state, _weights_filter())))
  elif isinstance(model_or_state, Mapping):
    if model_or_state and all(isinstance(k, tuple) for k in model_or_state):
      # Already {path: array}; canonical paths via the nested form.
      flat = trees.flatten(trees.unflatten(model_or_state))
    else:
      flat = trees.flatten(model_or_state)
  else:
    raise TypeError(f'Expected an nnx model or a nested dict of arrays, got '
                    f'{type(model_or_state).__name__}.')
  return {k: np.asarray(jax.device_get(v)) for k, v in flat.items()}


def check_state(flat: Mapping[tuple, Any], metadata: Mapping[str, Any]):
  """Raises ValueError if ``flat`` does not fit the model in ``metadata``."""
  expected = expected_shapes(metadata['model']['name'],
                             include_top=metadata['include_top'],
                             **model_options(metadata))
  diffs = describe_differences(
      {trees.path_str(k): v[0] for k, v in expected.items()},
      {trees.path_str(k): tuple(np.shape(v)) for k, v in flat.items()})
  if diffs:
    raise ValueError(
        f'The weights do not fit {metadata["model"]["name"]} with options '
        f'{model_options(metadata)} (include_top={metadata["include_top"]}):'
        '\n  ' + '\n  '.join(diffs))


def save_pretrained(directory, model, metadata: Mapping[str, Any], *,
                    overwrite: bool = False) -> epath.Path:
  """Writes a pretrained dir; all or nothing.

  Everything is written to a temporary sibling directory that is renamed to
  ``directory`` at the end, so a failure leaves no partial output. Single
  process only.

  Args:
    directory: the pretrained dir to create.
    model: a ``VGG`` module, or its Params and BatchStats as a nested dict
      (``nnx.to_pure_dict`` layout, int or digit-string list indices).
    metadata: from ``make_metadata``; checked against the weights.
    overwrite: replace an existing ``directory``.

  Returns:
    The directory's path.

  Raises:
    FileExistsError: ``directory`` exists and ``overwrite`` is False.
    ValueError: bad metadata or weights that do not fit its model.
  """
  if metadata.get('format') != FORMAT:
    raise ValueError(f'metadata["format"] must be {FORMAT!r}; build it with '
                     'make_metadata().')
  flat = _pure_weights(model)
  check_state(flat, metadata)
  with paths.replaced_atomically(directory, overwrite=overwrite) as tmp:
    tmp.mkdir()
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(tmp / STATE_DIR, trees.unflatten(flat))
    (tmp / METADATA_FILE).write_text(json.dumps(dict(metadata), indent=2))
  return paths.absolute(directory)


def is_pretrained_dir(path) -> bool:
  """Whether ``path`` is a pretrained dir (metadata of this format + state)."""
  path = paths.absolute(path)
  try:
    meta = json.loads((path / METADATA_FILE).read_text())
  except (OSError, ValueError):
    return False
  return (isinstance(meta, dict) and meta.get('format') == FORMAT and
          (path / STATE_DIR).is_dir())


def read_metadata(directory) -> dict[str, Any]:
  """The metadata of a pretrained dir.

  Raises:
    ValueError: not a pretrained dir, or an unknown format version.
  """
  directory = paths.absolute(directory)
  file = directory / METADATA_FILE
  if not file.exists() or not (directory / STATE_DIR).is_dir():
    raise ValueError(f'{directory} is not a pretrained dir: it needs '
                     f'{METADATA_FILE} and {STATE_DIR}/ (make one with '
                     '`python -m vgg_jax.convert`).')
  meta = json.loads(file.read_text())
  if meta.get('format') != FORMAT:
    raise ValueError(f'{file}: format {meta.get("format")!r} is not '
                     f'{FORMAT!r}.')
  return meta


def _fitting_shapes(directory, name: str, include_top: bool,
                    options: Mapping[str, Any]
                    ) -> dict[tuple, tuple[tuple[int, ...], Any]]:
  """``expected_shapes``, after checking the stored weights have them."""
  expected = expected_shapes(name, include_top=include_top, **options)
  tree = ocp.PyTreeCheckpointer().metadata(
      paths.absolute(directory) / STATE_DIR).item_metadata.tree
  diffs = describe_differences(
      {trees.path_str(k): v[0] for k, v in expected.items()},
      {trees.path_str(k): tuple(v.shape)
       for k, v in trees.flatten(tree).items()})
  if diffs:
    raise ValueError(
        f'{directory} does not fit {name} with options {dict(options)}:\n  '
        + '\n  '.join(diffs))
  return expected


def load_state_dict(directory) -> tuple[PureDict, dict[str, Any]]:
  """The weights of a pretrained dir as host arrays, and its metadata.

  Args:
    directory: a pretrained dir.

  Returns:
    ``(state, metadata)``: ``state`` is the nested dict of NumPy arrays in
    the ``nnx.to_pure_dict`` layout with int list indices (``blocks[0]
    ['convs'][0]['kernel']``, ...; no ``fc6``/``fc7``/``fc8`` when
    ``metadata['include_top']`` is False).
  """
  meta = read_metadata(directory)
  path = paths.absolute(directory) / STATE_DIR
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  restore_args = jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  state = checkpointer.restore(path, restore_args=restore_args)
  return trees.canonical(state), meta


def _dropout_rng_state(abstract_rest: nnx.State,
                       rngs: nnx.Rngs | int) -> PureDict:
  """The RNG state ``create_model(rngs=rngs)`` gives its dropout layers."""
  if not isinstance(rngs, nnx.Rngs):  # create_model's seeding convention
    rngs = nnx.Rngs(params=rngs, dropout=rngs + 1)
  probe = dict(nnx.to_flat_state(nnx.state(nnx.Dropout(0.5, rngs=rngs))))
  out = {}
  for path, _ in nnx.to_flat_state(abstract_rest):
    path = tuple(path)
    if path[-2:] not in probe:
      raise ValueError(f'Unexpected non-weight state {trees.path_str(path)} '
                       'in the model; cannot rebuild it without initialising.')
    out[path] = probe[path[-2:]].get_value()
  return trees.unflatten(out)


def _random_head(name: str, options: Mapping[str, Any],
                 rngs: nnx.Rngs | int) -> dict[tuple, jax.Array]:
  """FC-6..FC-8 initialised as ``create_model`` does, in one compiled call."""
  shapes = {k: v for k, v in expected_shapes(name, **options).items()
            if k[0] in HEAD_LAYERS}
  kernel_init = models.initializer(models.ModelOptions.create(**options).init)
  key = rngs.params() if isinstance(rngs, nnx.Rngs) else jax.random.key(rngs)

  size = sum(math.prod(shape) for shape, _ in shapes.values())

  @functools.partial(jax.jit,
                     compiler_options=models.init_compiler_options(size))
  def init(key):
    out = {}
    for i, (path, (shape, dtype)) in enumerate(sorted(shapes.items())):
      out[path] = (kernel_init(jax.random.fold_in(key, i), shape, dtype)
                   if path[-1] == 'kernel' else jnp.zeros(shape, dtype))
    return out
  return init(key)


def load_pretrained(directory, *, rngs: nnx.Rngs | int = 0,
                    **model_overrides) -> tuple[models.VGG, dict[str, Any]]:
  """Builds the model of a pretrained dir with its weights.

  Args:
    directory: a pretrained dir.
    rngs: seed or ``nnx.Rngs`` for the dropout stream and, for
      ``include_top=False`` dirs, the random head.
    **model_overrides: ``create_model`` options that replace the recorded
      ones, e.g. ``dtype='bfloat16'``, ``dropout_rate=0.0``. Options that
      change weight shapes (``num_classes``, ``fc6_kernel``, ...) are errors
      unless they only touch the random head of an ``include_top=False`` dir.

  Returns:
    ``(model, metadata)``: the model in eval mode (``model.train()`` to
    fine-tune) on the default device, and the metadata with ``model``
    updated by the overrides.

  Raises:
    ValueError: not a pretrained dir, an override of ``name``, or weights
      that do not fit the model the options describe.
  """
  meta = read_metadata(directory)
  if 'name' in model_overrides:
    raise ValueError('The model name of a pretrained dir cannot be '
                     'overridden.')
  name = meta['model']['name']
  options = {**model_options(meta), **model_overrides}
  include_top = meta['include_top']
  expected = _fitting_shapes(directory, name, include_top, options)
  # Build shapes only: random init of FC-6 alone takes seconds (minutes with
  # compilation on a small CPU), and the file replaces it anyway.
  graphdef, weights, rest = nnx.split(models.abstract_model(name, **options),
                                      _weights_filter(), ...)
  nnx.replace_by_pure_dict(rest, _dropout_rng_state(rest, rngs))

  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
            for k, (shape, dtype) in expected.items()}
  restored = ocp.StandardCheckpointer().restore(
      paths.absolute(directory) / STATE_DIR, trees.unflatten(target))
  values = trees.flatten(restored)
  if not include_top:
    values.update(_random_head(name, options, rngs))
  nnx.replace_by_pure_dict(weights, trees.unflatten(values))
  model = nnx.merge(graphdef, weights, rest)
  model.eval()
  meta = copy.deepcopy(meta)
  meta['model'] = {'name': name,
                   **models.ModelOptions.create(**options).as_dict()}
  return model, meta
