"""Fine-tuning: which layers ``init_from`` copies, which train, and how fast.

Four config choices, all in ``config.train`` / ``config.input``:

- ``train.init_layers`` (default ``'matching'``): the layers
  ``weights.init_from`` copies from a training workdir or a pretrained dir.

  * ``'matching'``: every layer the source has with the model's shapes. Only
    FC-8 may differ (another ``num_classes``: it starts from random), and the
    head (FC-6..FC-8) may be absent (trunk-only ``--include_top=false``
    weights: it starts from random). Any other difference is an error naming
    the layers, so a wrong source never half-loads.
  * ``'trunk'``: the conv layers (and their BN) only; the head starts from
    random.
  * a comma-separated list (or a Python list) of ``trunk``, ``head``,
    ``fc6``, ``fc7``, ``fc8``, conv names ``conv3_1`` or parameter paths
    ``blocks.2.convs.0``, e.g. ``'trunk,fc6,fc7'``: exactly those, each of
    which must be in the source with the model's shapes.

  A conv layer always travels with its batch norm (``_bn`` nets).
- ``train.freeze``: ``'none'`` (train everything), ``'trunk'`` (the conv
  trunk, BN included, is fixed; FC-6..FC-8 train) or ``'all_but_fc8'`` (a
  linear classifier on FC-7's features). Frozen parameters get no update,
  no weight decay and no optimiser state, and the step differentiates only
  with respect to the trainable ones, so no backward pass runs through a
  frozen trunk. BN layers of a frozen trunk use their running statistics in
  training mode too, so those statistics stay as loaded.
- ``train.new_layers_lr_mult`` (default 1.0): the learning rate of the layers
  ``init_from`` did not copy is multiplied by this (the usual x10 for a new
  FC-8). The per-layer factors live in the optimiser state, so a resumed run
  scales the same layers without reading ``init_from`` again.
- ``input.normalization_from_init`` (default True): the input normalisation
  (and mean RGB, and with it the channel order) recorded with the
  ``init_from`` weights replaces the config's when the config leaves them at
  the base defaults (``vgg_jax/configs/base.py``); a config that sets another
  value keeps it, with a warning naming both. False: always the config's.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import nnx

from vgg_jax import preprocessing
from vgg_jax import trees
from vgg_jax.configs import base

FREEZE_CHOICES = ('none', 'trunk', 'all_but_fc8')
INIT_LAYER_MODES = ('matching', 'trunk')
HEAD_LAYERS = ('fc6', 'fc7', 'fc8')
CLASS_LAYER = 'fc8'  # the layer whose width is num_classes

Shapes = Mapping[trees.Path, Any]  # {path: anything with .shape or a shape}


# ---------------------------------------------------------------------------
# Layers: a conv layer is ``blocks.b.convs.i`` (with ``blocks.b.norms.i`` on
# ``_bn`` nets), a head layer ``fc6``/``fc7``/``fc8``.

def layer_of(path: trees.Path) -> str:
  """The layer of a parameter or module path (a BN belongs to its conv)."""
  if path[0] == 'blocks':
    return f'blocks.{path[1]}.convs.{path[3]}'
  return str(path[0])


def layers_of(flat: Shapes) -> list[str]:
  """The layers of a flat weight tree, convs in order, then the head."""
  layers = {layer_of(p) for p in flat}
  return sorted(layers, key=lambda l: (l in HEAD_LAYERS, _numbers(l), l))


def _numbers(layer: str) -> tuple[int, ...]:
  return tuple(int(n) for n in re.findall(r'\d+', layer))


def conv_alias(layer: str) -> str:
  """``blocks.2.convs.0`` -> ``conv3_1`` (the name users know)."""
  b, i = _numbers(layer)
  return f'conv{b + 1}_{i + 1}'


def _modules(flat: Shapes) -> dict[str, dict[str, tuple[int, ...]]]:
  """``{module: {leaf: shape}}``, e.g. ``{'blocks.0.norms.0': {'mean': ..}}``."""
  out: dict[str, dict[str, tuple[int, ...]]] = {}
  for path, value in flat.items():
    shape = tuple(getattr(value, 'shape', value))
    out.setdefault(trees.path_str(path[:-1]), {})[str(path[-1])] = shape
  return out


def _module_issues(module: str, source: Mapping[str, Mapping[str, Any]],
                  target: Mapping[str, Mapping[str, Any]]) -> list[str]:
  """Why ``source`` cannot give ``target`` one module (empty: it can)."""
  if module not in source:
    return [f'{module} is missing']
  issues = []
  for leaf, want in target[module].items():
    have = source[module].get(leaf)
    if have is None:
      issues.append(f'{module}.{leaf} is missing')
    elif tuple(have) != tuple(want):
      issues.append(f'{module}.{leaf} has shape {tuple(have)}, the model '
                    f'wants {tuple(want)}')
  return issues


def describe_differences(source: Shapes, target: Shapes) -> list[str]:
  """Every module where two flat weight trees differ, one line each.

  Args:
    source: the weights offered (``{path: array or shape}``).
    target: the model's.
  """
  src, dst = _modules(source), _modules(target)
  lines = [line for m in dst for line in _module_issues(m, src, dst)]
  lines += [f'{m} is not in the model' for m in src if m not in dst]
  return lines


# ---------------------------------------------------------------------------
# What init_from copies.

@dataclasses.dataclass(frozen=True)
class CopyPlan:
  """What ``init_from`` does with each layer of the model.

  Attributes:
    copy: the layers copied, in model order.
    new: the layers left at their random initialisation.
    problems: why the source cannot feed the model as asked (empty: it can);
      nothing may be copied unless this is empty.
  """
  copy: tuple[str, ...]
  new: tuple[str, ...]
  problems: tuple[str, ...]


def _expand(item: str, candidates: Sequence[str]) -> list[str]:
  """One ``train.init_layers`` entry as layers; [] for an unknown name."""
  item = item.strip()
  if item == 'trunk':
    return [l for l in candidates if l not in HEAD_LAYERS]
  if item == 'head':
    return [l for l in candidates if l in HEAD_LAYERS]
  match = re.fullmatch(r'conv(\d+)_(\d+)', item)
  if match:
    b, i = (int(n) - 1 for n in match.groups())
    return [f'blocks.{b}.convs.{i}']
  return [item] if item in HEAD_LAYERS or item.startswith('blocks.') else []


def _requested(init_layers: str | Iterable[str], candidates: Sequence[str],
               layers: Sequence[str]) -> tuple[list[str], bool, list[str]]:
  """``(layers to copy, strict, problems)`` of a ``train.init_layers``."""
  if init_layers == 'matching':
    return list(candidates), False, []
  items = (init_layers.split(',') if isinstance(init_layers, str)
           else list(init_layers))
  wanted, problems = [], []
  for item in items:
    got = _expand(item, candidates)
    if not got or any(l not in layers for l in got):
      problems.append(
          f'train.init_layers: unknown layer {item.strip()!r}; valid: '
          f'{", ".join(INIT_LAYER_MODES)}, or a list of trunk, head, '
          f'{", ".join(HEAD_LAYERS)}, conv names such as conv1_1')
    for layer in got:
      if layer in layers and layer not in candidates:
        problems.append(f'{layer} ({conv_alias(layer)}) cannot be copied '
                        'from this source (net A gives a deeper net only its '
                        'first four conv layers)')
      elif layer in layers and layer not in wanted:
        wanted.append(layer)
  return wanted, True, problems


def _may_start_fresh(layer: str, issues: Sequence[str],
                     modules: Sequence[str]) -> bool:
  """'matching' tolerates a differing FC-8 and an absent head layer."""
  if layer == CLASS_LAYER:
    return True
  return layer in HEAD_LAYERS and issues == [f'{m} is missing'
                                             for m in modules]


def plan_copy(source: Shapes, target: Shapes, candidates: Sequence[str],
              init_layers: str | Iterable[str] = 'matching') -> CopyPlan:
  """Decides which layers of ``source`` go into the model, on shapes alone.

  Args:
    source: the source's weights, flat (``{path: array or shape}``).
    target: the model's, flat.
    candidates: the layers the architectures allow to copy, in model order
      (all of them for the same net; net A's first four convs and the head
      for a deeper net).
    init_layers: ``'matching'``, ``'trunk'`` or a list (see the module
      docstring).

  Returns:
    The plan; check ``problems`` before copying anything.
  """
  src, dst = _modules(source), _modules(target)
  layers = layers_of(target)
  if init_layers == 'trunk':
    init_layers = ('trunk',)
  wanted, strict, problems = _requested(init_layers, candidates, layers)
  copied = []
  for layer in wanted:
    modules = [m for m in dst if layer_of(_path(m)) == layer]
    issues = [i for m in modules for i in _module_issues(m, src, dst)]
    if not issues:
      copied.append(layer)
    elif strict or not _may_start_fresh(layer, issues, modules):
      problems.extend(issues)
  copied.sort(key=layers.index)
  return CopyPlan(copy=tuple(copied),
                  new=tuple(l for l in layers if l not in copied),
                  problems=tuple(problems))


def _path(module: str) -> trees.Path:
  """``'blocks.0.convs.1'`` -> ``('blocks', 0, 'convs', 1)``."""
  return tuple(int(p) if p.isdigit() else p for p in module.split('.'))


def describe_layers(layers: Sequence[str]) -> str:
  """Layers for a log line: conv names (``conv1_1``) and ``fc6``... ."""
  return ', '.join(l if l in HEAD_LAYERS else conv_alias(l)
                   for l in layers) or 'none'


# ---------------------------------------------------------------------------
# Freezing.

def check_freeze(freeze: str) -> str:
  """``freeze`` if it is one of ``FREEZE_CHOICES``; a ValueError otherwise."""
  if freeze in ('all', 'everything'):
    raise ValueError(
        f'train.freeze={freeze!r} would freeze every layer and leave nothing '
        f'to train; valid: {", ".join(FREEZE_CHOICES)} (all_but_fc8 trains '
        'a linear classifier on FC-7).')
  if freeze not in FREEZE_CHOICES:
    raise ValueError(f'Unknown train.freeze {freeze!r}; valid: '
                     f'{", ".join(FREEZE_CHOICES)}.')
  return freeze


def trainable_filter(freeze: str) -> nnx.filterlib.Filter:
  """The ``nnx`` filter of the parameters a ``train.freeze`` choice trains."""
  check_freeze(freeze)
  if freeze == 'none':
    return nnx.Everything()
  if freeze == 'trunk':
    return nnx.Any(*(nnx.PathContains(l) for l in HEAD_LAYERS))
  return nnx.PathContains(CLASS_LAYER)


def split_trainable(params: nnx.State, trainable: nnx.filterlib.Filter
                    ) -> tuple[nnx.State, nnx.State]:
  """``(trainable, frozen)`` parameters; ``nnx.merge_state`` joins them."""
  return nnx.split_state(params, trainable, ...)


def freeze_batch_norms(model: nnx.Module, freeze: str) -> None:
  """Makes the BN layers of a frozen trunk use running statistics.

  Call after ``model.train()``: in training mode the BN layers of a frozen
  trunk then normalise with (and keep) their loaded statistics, as at test
  time, instead of batch statistics that would also update them.
  """
  if check_freeze(freeze) == 'none' or not model.batch_norm:
    return
  for block in model.blocks:
    for norm in block.norms:
      norm.use_running_average = True


# ---------------------------------------------------------------------------
# The learning-rate multiplier of new layers.

class LeafScaleState(NamedTuple):
  """One float32 scale per parameter leaf (checkpointed with the rest)."""
  scales: Any


def scale_by_leaf(scales: Any) -> optax.GradientTransformation:
  """Multiplies each leaf's update by its own scale, kept in the state.

  Args:
    scales: a tree of floats with the structure of the parameters; it is
      the initial state, so a restored checkpoint brings its own.
  """
  def init_fn(params):
    del params
    return LeafScaleState(jax.tree.map(
        lambda s: jnp.asarray(s, jnp.float32), scales))

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * s.astype(u.dtype), updates,
                        state.scales), state
  return optax.GradientTransformation(init_fn, update_fn)


def _path_names(path) -> trees.Path:
  """A ``tree_map_with_path`` path as plain keys, without ``value``."""
  names = [getattr(p, 'key', getattr(p, 'name', getattr(p, 'idx', p)))
           for p in path]
  return tuple(n for n in names if n != 'value')


def new_layer_scales(params: Any, copied: Iterable[str] | None,
                     mult: float) -> Any:
  """``mult`` for the leaves of layers not ``copied``, 1.0 for the others.

  Args:
    params: the trainable parameters.
    copied: the layers ``init_from`` copied; None: unknown (a resumed run
      restores the scales), all 1.0.
    mult: ``train.new_layers_lr_mult``.
  """
  keep = None if copied is None else set(copied)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: (1.0 if keep is None or layer_of(_path_names(path))
                       in keep else mult), params)


def check_lr_mult(mult: float) -> float:
  """``mult`` as a float if positive; a ValueError otherwise."""
  if not mult > 0:
    raise ValueError(f'Bad train.new_layers_lr_mult {mult}: must be > 0.')
  return float(mult)


# ---------------------------------------------------------------------------
# Input normalisation from the init_from weights.

def _input_spec(normalization: str, mean_rgb: Any) -> tuple[str, Any]:
  """What the input looks like; the mean only matters for ``mean_rgb``."""
  if normalization != 'mean_rgb':
    return normalization, None
  mean = preprocessing.IMAGENET_MEAN_RGB if mean_rgb is None else mean_rgb
  return normalization, tuple(float(v) for v in mean)


def _describe(spec: tuple[str, Any]) -> str:
  order = 'BGR' if spec[0] == 'caffe_bgr' else 'RGB'
  mean = f', mean_rgb={list(spec[1])}' if spec[1] else ''
  return f'{spec[0]} ({order}{mean})'


def source_normalization(config: ml_collections.ConfigDict,
                         recorded: Mapping[str, Any],
                         where: str) -> ml_collections.ConfigDict:
  """``config`` with the input normalisation its init weights expect.

  The normalisation ``recorded`` with the weights is used unless the config
  sets one explicitly, i.e. ``input.normalization`` / ``input.mean_rgb``
  differ from the base defaults or ``input.normalization_from_init`` is
  False; an explicit setting that differs from the weights' is kept with a
  warning naming both. One log line says which is used.

  Args:
    config: the run config (not changed).
    recorded: metadata stored with the weights (``normalization``,
      ``mean_rgb``): a pretrained dir's or a checkpoint's.
    where: the weights' directory, for the messages.

  Returns:
    ``config`` itself, or a copy with ``input.normalization`` and
    ``input.mean_rgb`` replaced.
  """
  if not recorded.get('normalization'):
    return config
  inp = config.input
  have = _input_spec(inp.normalization, inp.mean_rgb)
  theirs = _input_spec(recorded['normalization'], recorded.get('mean_rgb'))
  default = base.get_config().input
  explicit = (not inp.get('normalization_from_init', True) or
              have != _input_spec(default.normalization, default.mean_rgb))
  if have == theirs:
    logging.info('Input normalisation %s: the config\'s, as %s expects.',
                 _describe(have), where)
    return config
  if explicit:
    logging.warning(
        'Input normalisation: the config sets %s but the weights in %s '
        'expect %s; using the config\'s.', _describe(have), where,
        _describe(theirs))
    return config
  logging.info('Input normalisation %s from %s (the config does not set '
               'one).', _describe(theirs), where)
  config = copy.deepcopy(config)
  config.input.normalization = theirs[0]
  if theirs[1] is not None:
    config.input.mean_rgb = theirs[1]
  return config
