"""Orbax checkpoints of training runs, and loading models from them.

A workdir holds ``config.json`` (the run's config) and ``checkpoints/<step>/``
with three items saved together:

- ``state``: step, parameters, BN statistics and optimiser state (arrays);
- ``meta``: JSON: the model config, the plateau schedule, the RNG seed, the
  input normalisation and class names, the validation result if any;
- ``data``: each process's Grain iterator position.

The last ``keep_checkpoints`` are kept plus the best by validation top-1.
Saves are asynchronous; a save is only visible once complete, so a run that
dies mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from vgg_jax import models

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
# Model options that change the parameter shapes or meaning: a checkpoint is
# only loadable into a model that agrees on all of them.
ARCHITECTURE_FIELDS = ('name', 'num_classes', 'width_multiplier', 'fc6_kernel',
                       'in_channels')


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model the config asks for."""


def absolute(path: str) -> str:
  """Local paths made absolute (Orbax requires it); URLs (gs://) unchanged."""
  path = str(path)
  return path if '://' in path else os.path.abspath(path)


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes the run's config to ``workdir/config.json`` (host 0 only)."""
  if jax.process_index() != 0:
    return
  path = epath.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  (path / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was started with.

  Args:
    workdir: the run's workdir.

  Raises:
    FileNotFoundError: no ``config.json`` there.
  """
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(
        f'{path} not found: {workdir!r} is not a vgg_jax training workdir.')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def model_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``create_model`` keyword options from ``config.model`` (name excluded)."""
  opts = dict(config.model)
  opts.pop('name')
  return opts


def create_manager(workdir: str, config: ml_collections.ConfigDict
                   ) -> ocp.CheckpointManager:
  """The run's checkpoint manager: last N plus the best, async saves.

  Args:
    workdir: the run's workdir; checkpoints go to ``workdir/checkpoints``.
    config: the run config (``train.keep_checkpoints``).
  """
  policies = ocp.checkpoint_managers
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policies.AnyPreservationPolicy([
          policies.LatestN(n=max(1, config.train.keep_checkpoints)),
          policies.BestN(get_metric_fn=_top1, reverse=False, n=1,
                         keep_checkpoints_without_metrics=False),
      ]),
      best_fn=_top1, best_mode='max',
      enable_async_checkpointing=True, create=True)
  return ocp.CheckpointManager(
      epath.Path(absolute(workdir)) / CHECKPOINT_DIR, options=options,
      item_names=('state', 'meta', 'data'))


def _top1(metrics: dict[str, float]) -> float:
  return float(metrics['val_top1'])


def check_compatible(saved_model: dict[str, Any],
                     config: ml_collections.ConfigDict, where: str) -> None:
  """Raises if a checkpoint's model config differs in shape-relevant fields.

  Args:
    saved_model: the ``model`` entry of the checkpoint's metadata.
    config: the current run config.
    where: the checkpoint path, for the message.

  Raises:
    CheckpointMismatchError: listing every differing field.
  """
  current = dict(name=config.model.name, **model_options(config))
  current.setdefault('in_channels', 3)
  saved = dict(saved_model)
  saved.setdefault('in_channels', 3)
  diffs = [f'{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}'
           for k in ARCHITECTURE_FIELDS if saved.get(k) != current.get(k)]
  if diffs:
    raise CheckpointMismatchError(
        f'The checkpoint in {where} was written for a different model; '
        'refusing a partial load. Differences: ' + '; '.join(diffs) +
        '. Use another --workdir, or make the config match.')


def restore_args(abstract_state: Any, data_iterator: Any | None):
  """Composite restore args for ``state``, ``meta`` and (optionally) ``data``."""
  from vgg_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  items = dict(state=ocp.args.StandardRestore(abstract_state),
               meta=ocp.args.JsonRestore())
  if data_iterator is not None:
    items['data'] = input_pipeline.checkpoint_restore_args(data_iterator)
  return ocp.args.Composite(**items)


def save_args(state: Any, meta: dict[str, Any], data_iterator: Any | None):
  """Composite save args for ``state``, ``meta`` and (optionally) ``data``."""
  from vgg_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
  if data_iterator is not None:
    items['data'] = input_pipeline.checkpoint_save_args(data_iterator)
  return ocp.args.Composite(**items)


def _resolve_step(manager: ocp.CheckpointManager, checkpoint: str | int,
                  where: str) -> int:
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f'No checkpoint in {where}.')
  if checkpoint in ('latest', None, ''):
    return manager.latest_step()
  if checkpoint == 'best':
    return manager.best_step()
  try:
    step = int(checkpoint)
  except ValueError:
    raise ValueError(f'Bad checkpoint {checkpoint!r}: use latest, best or a '
                     'step number.') from None
  if step not in steps:
    raise FileNotFoundError(f'No checkpoint at step {step} in {where}; '
                            f'available: {sorted(steps)}.')
  return step


def read_meta(workdir: str, checkpoint: str | int = 'latest'
              ) -> tuple[int, dict[str, Any]]:
  """The step and metadata of one checkpoint of a workdir."""
  where = str(epath.Path(absolute(workdir)) / CHECKPOINT_DIR)
  with ocp.CheckpointManager(where, item_names=('state', 'meta', 'data'),
                             options=ocp.CheckpointManagerOptions(
                                 read_only=True, best_fn=_top1,
                                 best_mode='max')) as mgr:
    step = _resolve_step(mgr, checkpoint, where)
    meta = mgr.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))['meta']
  return step, meta


def load_variables(path: str, checkpoint: str | int = 'latest'
                   ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
  """Parameters and BN statistics of a workdir or pretrained dir, as dicts.

  Args:
    path: a training workdir or a directory written by ``vgg_jax.convert``.
    checkpoint: for workdirs: ``latest``, ``best`` or a step.

  Returns:
    ``(params, batch_stats, meta)``: nested dicts of arrays (as in
    ``nnx.State.to_pure_dict()``) and the checkpoint metadata, whose ``model``
    entry holds the model name and options.
  """
  from vgg_jax import pretrained  # pylint: disable=g-import-not-at-top
  if pretrained.is_pretrained_dir(path):
    state, meta = pretrained.load_state_dict(path)
    params, stats = _split_pure(state)
    return params, stats, meta
  step, meta = read_meta(path, checkpoint)
  where = epath.Path(absolute(path)) / CHECKPOINT_DIR / str(step) / 'state'
  raw = _strip_variable_boxes(ocp.StandardCheckpointer().restore(where))
  meta = dict(meta, step=step)
  return raw['params'], raw.get('batch_stats', {}), meta


def _strip_variable_boxes(tree):
  """nnx.State saves each variable as ``{'value': array}``; unbox them."""
  if isinstance(tree, dict):
    if set(tree) == {'value'} and not isinstance(tree['value'], dict):
      return tree['value']
    return {k: _strip_variable_boxes(v) for k, v in tree.items()}
  return tree


def _split_pure(state: dict[str, Any]):
  """Splits a full pure state dict into (params, batch_stats)."""
  params, stats = {}, {}

  def walk(node, p_out, s_out):
    for k, v in node.items():
      if isinstance(v, dict):
        walk(v, p_out.setdefault(k, {}), s_out.setdefault(k, {}))
      elif k in ('mean', 'var'):
        s_out[k] = v
      else:
        p_out[k] = v
  walk(state, params, stats)
  return params, stats


def load_model(path: str, *, checkpoint: str | int = 'latest'
               ) -> tuple[models.VGG, ml_collections.ConfigDict, dict[str, Any]]:
  """A model ready for inference from a training workdir or pretrained dir.

  Args:
    path: a training workdir (``config.json`` + ``checkpoints/``) or a
      directory written by ``python -m vgg_jax.convert``.
    checkpoint: for workdirs: ``latest``, ``best`` or a step number.

  Returns:
    ``(model, config, metadata)``; the model is in eval mode; ``metadata`` has
    ``normalization``, ``mean_rgb``, ``class_names`` and ``step``.
  """
  from vgg_jax import pretrained  # pylint: disable=g-import-not-at-top
  from vgg_jax.configs import base  # pylint: disable=g-import-not-at-top
  if pretrained.is_pretrained_dir(path):
    model, meta = pretrained.load_pretrained(path)
    config = base.get_config()
    config.model.update({k: v for k, v in meta['model'].items()
                         if k in config.model})
    config.input.normalization = meta['normalization']
    if meta.get('mean_rgb'):
      config.input.mean_rgb = tuple(meta['mean_rgb'])
    meta = dict(meta, step=0)
  else:
    config = read_config(path)
    params, stats, meta = load_variables(path, checkpoint)
    model = nnx.eval_shape(lambda: models.create_model(
        config.model.name, **model_options(config)))
    check_compatible(meta['model'], config, path)
    graphdef, state = nnx.split(model)
    pure = state.to_pure_dict()
    _merge_into(pure, params, path)
    _merge_into(pure, stats, path)
    model = nnx.merge(graphdef, state_from_pure(state, pure))
  model.eval()
  return model, config, meta


def _merge_into(target: dict, source: dict, where: str, prefix=()) -> None:
  for k, v in source.items():
    key = int(k) if isinstance(k, str) and k.isdigit() else k
    if key not in target:
      raise CheckpointMismatchError(
          f'{where}: unexpected variable {"/".join(map(str, prefix + (k,)))}.')
    if isinstance(v, dict):
      _merge_into(target[key], v, where, prefix + (k,))
    else:
      if tuple(target[key].shape) != tuple(v.shape):
        raise CheckpointMismatchError(
            f'{where}: {"/".join(map(str, prefix + (k,)))} has shape '
            f'{tuple(v.shape)}, the model wants {tuple(target[key].shape)}.')
      target[key] = v


def state_from_pure(state: nnx.State, pure: dict) -> nnx.State:
  """A copy of ``state`` holding the arrays of the nested dict ``pure``."""
  state = jax.tree.map(lambda x: x, state)
  nnx.replace_by_pure_dict(state, pure)
  return state
