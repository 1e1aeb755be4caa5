"""Weights from a training workdir or a pretrained dir, and layer copying.

Two ways weights leave a directory and enter a model:

- ``load_model`` / ``load_variables``: a whole model for inference
  (``evaluate``, ``predict``, notebooks) from either kind of directory;
- ``init_from``: the paper's initialisation chain (Sec. 3.1): the layers of a
  trained net copied into a freshly initialised one before training.

Weight trees are handled in ``vgg_jax.trees``' flat form (``{path: array}``
with int list indices), whatever wrote them (Orbax training checkpoints,
pretrained dirs, live models), so they compare and copy path by path.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from vgg_jax import checkpointing
from vgg_jax import finetune
from vgg_jax import models
from vgg_jax import pretrained
from vgg_jax import trees
from vgg_jax.configs import base

CheckpointMismatchError = checkpointing.CheckpointMismatchError
DamagedCheckpointError = checkpointing.DamagedCheckpointError
# Leaves of a BN layer that are running statistics (nnx.BatchStat), not
# trainable parameters.
BATCH_STAT_LEAVES = ('mean', 'var')
HEAD_LAYERS = ('fc6', 'fc7', 'fc8')
# Net A's conv layers that initialise a deeper net (Sec. 3.1: "the first four
# convolutional layers and the last three fully-connected layers").
NET_A_CONV_LAYERS = 4
# What init_from copies: trainable weights and BN running statistics.
_WEIGHTS = nnx.Any(nnx.Param, nnx.BatchStat)

Flat = dict[trees.Path, Any]


def load_variables(path: str, checkpoint: str | int = 'latest'
                   ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
  """Parameters and BN statistics of a workdir or pretrained dir, as dicts.

  Args:
    path: a training workdir or a directory written by ``vgg_jax.convert``.
    checkpoint: for workdirs: ``latest``, ``best`` or a step.

  Returns:
    ``(params, batch_stats, meta)``: nested dicts of arrays in the
    ``nnx.to_pure_dict`` layout with int list indices
    (``trees.canonical``), and the checkpoint metadata, whose ``model`` entry
    holds the model name and options (and, for workdirs, ``step``).

  Raises:
    DamagedCheckpointError: the checkpoint's files are damaged; the message
      names the step and the file (one line for ``evaluate``, ``predict`` and
      ``init_from``).
  """
  if pretrained.is_pretrained_dir(path):
    state, meta = pretrained.load_state_dict(path)
    params, stats = _split_pure(state)
    return params, stats, meta
  step, meta = checkpointing.read_meta(path, checkpoint)
  # Orbax keeps nnx's {'value': array} boxes and string list indices.
  arrays = trees.canonical(checkpointing.read_state(path, step))
  return (arrays['params'], arrays.get('batch_stats', {}),
          dict(meta, step=step))


def _split_pure(state: Mapping[Any, Any]) -> tuple[dict, dict]:
  """Splits a full pure state dict into ``(params, batch_stats)``."""
  flat = trees.flatten(state)
  params = {p: v for p, v in flat.items() if p[-1] not in BATCH_STAT_LEAVES}
  stats = {p: v for p, v in flat.items() if p[-1] in BATCH_STAT_LEAVES}
  return trees.unflatten(params), trees.unflatten(stats)


def load_model(path: str, *, checkpoint: str | int = 'latest'
               ) -> tuple[models.VGG, ml_collections.ConfigDict,
                          dict[str, Any]]:
  """A model ready for inference from a training workdir or pretrained dir.

  Args:
    path: a training workdir (``config.json`` + ``checkpoints/``) or a
      directory written by ``python -m vgg_jax.convert``.
    checkpoint: for workdirs: ``latest``, ``best`` or a step number.

  Returns:
    ``(model, config, metadata)``; the model is in eval mode; ``metadata`` has
    ``normalization``, ``mean_rgb``, ``class_names`` and ``step``.

  Raises:
    CheckpointMismatchError: the checkpoint does not fit the model its
      workdir's config describes.
    DamagedCheckpointError: the checkpoint's files are damaged.
  """
  if pretrained.is_pretrained_dir(path):
    model, config, meta = _load_pretrained(path)
  else:
    model, config, meta = _load_workdir(path, checkpoint)
  model.eval()
  return model, config, meta


def _load_pretrained(path: str):
  """``load_model`` for a pretrained dir: its model and a matching config."""
  model, meta = pretrained.load_pretrained(path)
  config = base.get_config()
  config.model.update({k: v for k, v in meta['model'].items()
                       if k in config.model})
  config.input.normalization = meta['normalization']
  if meta.get('mean_rgb'):
    config.input.mean_rgb = tuple(meta['mean_rgb'])
  return model, config, dict(meta, step=0)


def _load_workdir(path: str, checkpoint: str | int):
  """``load_model`` for a training workdir."""
  config = checkpointing.read_config(path)
  params, stats, meta = load_variables(path, checkpoint)
  checkpointing.check_compatible(meta['model'], config, path)
  # Shapes only: the checkpoint replaces every weight, so random init (slow
  # for FC-6) would be wasted.
  model = models.abstract_model(
      config.model.name,
      **models.ModelOptions.from_config(config.model).as_dict())
  graphdef, state = nnx.split(model)
  target = trees.flatten(nnx.to_pure_dict(state))
  for source in (params, stats):
    _merge_into(target, trees.flatten(source), path)
  model = nnx.merge(graphdef,
                    state_from_pure(state, trees.unflatten(target)))
  return model, config, meta


def _merge_into(target: Flat, source: Flat, where: str) -> None:
  """Puts every array of ``source`` into ``target``, which must expect it.

  Raises:
    CheckpointMismatchError: a path ``target`` lacks or a different shape.
  """
  for path, value in source.items():
    if path not in target:
      raise CheckpointMismatchError(
          f'{where}: unexpected variable {"/".join(map(str, path))}.')
    want = tuple(target[path].shape)
    if want != tuple(np.shape(value)):
      raise CheckpointMismatchError(
          f'{where}: {"/".join(map(str, path))} has shape '
          f'{tuple(np.shape(value))}, the model wants {want}.')
    target[path] = value


def state_from_pure(state: nnx.State, pure: Mapping[Any, Any]) -> nnx.State:
  """A copy of ``state`` holding the arrays of the nested dict ``pure``."""
  state = jax.tree.map(lambda x: x, state)
  nnx.replace_by_pure_dict(state, pure)
  return state


def init_from(model: models.VGG,
              config: ml_collections.ConfigDict) -> list[str]:
  """Copies layers from ``config.train.init_from`` into ``model`` in place.

  From the same architecture, every layer the source has with the model's
  shapes is copied: the whole net along the paper's S=256 -> S=384 ->
  multi-scale chain, all but a new FC-8 when ``num_classes`` differs, the
  trunk of trunk-only pretrained weights. A net-A (``vgg11``) checkpoint into
  a deeper net copies A's four conv layers block by block (A's block b,
  conv i -> block b, conv i; Sec. 3.1) and the three FC layers.
  ``train.init_layers`` narrows the choice (``vgg_jax.finetune``). The rest
  keeps its random initialisation. The plan is checked on shapes before
  any array is copied, so a mismatch leaves the model as it was. Copied
  arrays keep the model's dtypes and shardings.

  Args:
    model: the freshly initialised model.
    config: the run config.

  Returns:
    The copied layers (``blocks.b.convs.i``, ``fc6``...), in model order;
    the others are new.

  Raises:
    CheckpointMismatchError: another architecture than the same or
      A -> deeper, or a difference ``train.init_layers`` does not allow (the
      message lists the layers that differ).
  """
  where = config.train.init_from
  params, stats, meta = load_variables(where, 'latest')
  source = {**trees.flatten(params), **trees.flatten(stats)}
  target = _model_weights(model)
  candidates = _candidate_layers(meta['model']['name'], model,
                                 config.model.name, source, target, where)
  plan = finetune.plan_copy(source, target, candidates,
                            config.train.init_layers)
  if plan.problems:
    raise CheckpointMismatchError(
        f'init_from {where}: {"; ".join(plan.problems)}. train.init_layers '
        "chooses what to copy (e.g. 'trunk' or 'trunk,fc6,fc7'); the rest "
        'starts from random.')
  for path, like in target.items():
    if finetune.layer_of(path) in plan.copy:
      target[path] = _placed_like(source[path], like)
  _assign_weights(model, target)
  logging.info('init_from %s (%s, step %s): copied %s; new (random init): '
               '%s.', where, meta['model']['name'], meta.get('step'),
               finetune.describe_layers(plan.copy),
               finetune.describe_layers(plan.new))
  return list(plan.copy)


def source_metadata(path: str) -> dict[str, Any]:
  """What ``init_from`` weights record (model, normalisation), no arrays.

  Args:
    path: a training workdir (its latest checkpoint) or a pretrained dir.
  """
  if pretrained.is_pretrained_dir(path):
    return pretrained.read_metadata(path)
  return checkpointing.read_meta(path, 'latest')[1]


def _candidate_layers(src_name: str, model: models.VGG, dst_name: str,
                      source: Flat, target: Flat, where: str) -> list[str]:
  """The layers the two architectures allow ``init_from`` to copy."""
  src_arch, src_bn = models.parse_name(src_name)
  if src_name == dst_name:
    return finetune.layers_of(target)
  dst_arch, _ = models.parse_name(dst_name)
  if src_arch.config == 'A' and dst_arch.config == 'B-5x5':
    raise CheckpointMismatchError(
        f'init_from={where!r} holds net A ({src_name}), whose 3x3 convs do '
        f'not fit {dst_name}\'s 5x5 convs (Sec. 4.1\'s shallow net): start '
        'it with model.init=glorot, or init_from a run of the same net.')
  if src_arch.config == 'A' and src_bn == model.batch_norm:
    return _conv_layers(src_arch)[:NET_A_CONV_LAYERS] + list(HEAD_LAYERS)
  differ = finetune.describe_differences(source, target)
  more = f'; ... and {len(differ) - 20} more' if len(differ) > 20 else ''
  raise CheckpointMismatchError(
      f'init_from={where!r} holds {src_name}; it can initialise only the '
      'same architecture or, if it is net A '
      f'(vgg11{"_bn" if model.batch_norm else ""}), a deeper net; the '
      f'config asks for {dst_name}. Layers that differ: '
      f'{"; ".join(differ[:20])}{more}.')


def _conv_layers(arch: models.Architecture) -> list[str]:
  return [f'blocks.{b}.convs.{i}' for b, block in enumerate(arch.blocks)
          for i in range(len(block))]


def _model_weights(model: nnx.Module) -> Flat:
  """The model's parameters and BN statistics, flat."""
  return trees.flatten(nnx.to_pure_dict(nnx.state(model, _WEIGHTS)))


def _assign_weights(model: nnx.Module, flat: Flat) -> None:
  """Writes ``_model_weights``-style arrays back into the model."""
  state = nnx.state(model, _WEIGHTS)
  nnx.update(model, state_from_pure(state, trees.unflatten(flat)))


def _placed_like(value: Any, like: jax.Array) -> jax.Array:
  """``value`` with the dtype and (where it has one) sharding of ``like``."""
  sharding = getattr(like, 'sharding', None)
  if sharding is None:
    return jnp.asarray(value, like.dtype)
  # From the host, so a sharding over several processes' devices works too.
  return jax.device_put(np.asarray(value, like.dtype), sharding)
