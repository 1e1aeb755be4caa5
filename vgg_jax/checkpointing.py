"""Orbax checkpoints of training runs: what a workdir holds and how to read it.

A workdir holds ``config.json`` (the run's config) and ``checkpoints/<step>/``
with three items saved together:

- ``state``: step, parameters, BN statistics and optimiser state (arrays);
- ``meta``: JSON: the model config, the plateau schedule, the RNG seed, the
  input normalisation and class names, the validation result if any;
- ``data``: each process's Grain iterator position.

The last ``keep_checkpoints`` are kept plus the best by validation top-1.
Saves are asynchronous; a save is only visible once complete, so a run that
dies mid-save leaves the previous checkpoint intact.

A checkpoint damaged afterwards (a truncated or deleted array file, missing
or unparsable metadata) is found by `find_damage` (``checkpoint_damage``)
before anything is restored, and reported as a `DamagedCheckpointError`
naming the step and the file.

Loading a model from a workdir for inference, or layers from one into a new
run (``train.init_from``), is ``vgg_jax.weights``' job.
"""

from __future__ import annotations

import json
import logging as std_logging
import time
from typing import Any, Mapping

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from vgg_jax import checkpoint_damage
from vgg_jax import models
from vgg_jax import paths

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
# Where training moves damaged checkpoints, next to CHECKPOINT_DIR (outside
# it, so Orbax never lists them and a new save of the same step can happen).
DAMAGED_DIR = 'damaged_checkpoints'
ITEM_NAMES = ('state', 'meta', 'data')


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model the config asks for."""


class DamagedCheckpointError(ValueError):
  """A checkpoint's files are missing, truncated or unreadable."""


class CheckpointSaveError(RuntimeError):
  """Writing a checkpoint failed (a full disk, a file-size limit, a peer)."""


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
  absl_logger = std_logging.getLogger('absl')
  if not any(isinstance(f, _OrbaxErrorsOnOneLine)
             for f in absl_logger.filters):
    absl_logger.addFilter(_OrbaxErrorsOnOneLine())
  return ocp.CheckpointManager(
      paths.absolute(workdir) / CHECKPOINT_DIR, options=options,
      item_names=ITEM_NAMES)


def _top1(metrics: dict[str, float]) -> float:
  return float(metrics['val_top1'])


def check_compatible(saved_model: Mapping[str, Any],
                     config: ml_collections.ConfigDict, where: str) -> None:
  """Raises if a checkpoint's model config differs in shape-relevant fields.

  Fields missing on either side take their ``models.ModelOptions`` defaults
  (older checkpoints lack ``in_channels``).

  Args:
    saved_model: the ``model`` entry of the checkpoint's metadata.
    config: the current run config.
    where: the checkpoint path, for the message.

  Raises:
    CheckpointMismatchError: listing every differing field.
  """
  saved, current = _architecture(saved_model), _architecture(config.model)
  diffs = [f'{k}: checkpoint {saved[k]!r} vs config {current[k]!r}'
           for k in saved if saved[k] != current[k]]
  if diffs:
    raise CheckpointMismatchError(
        f'The checkpoint in {where} was written for a different model; '
        'refusing a partial load. Differences: ' + '; '.join(diffs) +
        '. Use another --workdir, or make the config match.')


def _architecture(model_config: Mapping[str, Any]) -> dict[str, Any]:
  """The name and the shape-relevant options of a model config."""
  options = models.ModelOptions.from_config(model_config).as_dict()
  return dict(name=model_config.get('name'),
              **{k: options[k] for k in models.ARCHITECTURE_FIELDS})


def restore_args(abstract_state: Any, data_iterator: Any | None):
  """Composite restore args for ``state``, ``meta`` and (optionally) ``data``.

  Args:
    abstract_state: the state tree with ``jax.ShapeDtypeStruct`` leaves
      (their shardings say where the arrays go).
    data_iterator: a fresh training iterator restored in place, or None.
  """
  items = dict(state=ocp.args.StandardRestore(abstract_state),
               meta=ocp.args.JsonRestore())
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  return ocp.args.Composite(**items)


def save_args(state: Any, meta: dict[str, Any], data_iterator: Any | None):
  """Composite save args for ``state``, ``meta`` and (optionally) ``data``.

  Args:
    state: the train state (arrays).
    meta: JSON-serialisable metadata.
    data_iterator: the training iterator (each process writes its own
      position; restoring needs the same process count and
      ``config.data.num_workers``), or None.
  """
  items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
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


def _checkpoint_dir(workdir: str) -> epath.Path:
  return paths.absolute(workdir) / CHECKPOINT_DIR


def read_meta(workdir: str, checkpoint: str | int = 'latest'
              ) -> tuple[int, dict[str, Any]]:
  """The step and metadata of one intact checkpoint of a workdir.

  Args:
    workdir: the run's workdir.
    checkpoint: ``latest``, ``best`` or a step number.

  Raises:
    FileNotFoundError: no checkpoint, or none at that step.
    DamagedCheckpointError: that checkpoint is damaged (`find_damage`).
    ValueError: a ``checkpoint`` that is none of the above.
  """
  where = str(_checkpoint_dir(workdir))
  with ocp.CheckpointManager(where, item_names=ITEM_NAMES,
                             options=ocp.CheckpointManagerOptions(
                                 read_only=True, best_fn=_top1,
                                 best_mode='max')) as mgr:
    step = _resolve_step(mgr, checkpoint, where)
    _check_intact(workdir, step)
    meta = mgr.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))['meta']
  return step, meta


def read_state(workdir: str, step: int) -> dict[str, Any]:
  """The ``state`` item of one checkpoint as saved, without a target tree.

  Args:
    workdir: the run's workdir.
    step: an existing checkpoint step (e.g. from ``read_meta``).

  Returns:
    Nested dicts of arrays: ``step``, ``params``, ``batch_stats``,
    ``opt_state``, with Orbax's string list indices and variable boxes
    (``trees.canonical`` removes both).

  Raises:
    DamagedCheckpointError: the arrays could not be read.
  """
  where = _checkpoint_dir(workdir) / str(step) / 'state'
  try:
    return ocp.StandardCheckpointer().restore(where)
  except Exception as e:  # pylint: disable=broad-except
    # TensorStore raises ValueError, OSError or a plain Exception.
    raise DamagedCheckpointError(
        f'Checkpoint {step} in {where.parent.parent} could not be read: '
        f'{checkpoint_damage.error_summary(e)}') from e


class _OrbaxErrorsOnOneLine(std_logging.Filter):
  """Orbax's log records of a failed save without their tracebacks.

  Orbax logs the failure once per thread, each with the same traceback; the
  `CheckpointSaveError` that follows names the step and the cause once.
  """

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.exc_info and '/orbax/' in record.pathname.replace('\\', '/'):
      record.msg = f'{record.getMessage()}: {checkpoint_damage.error_summary(record.exc_info[1])}'
      record.args, record.exc_info, record.exc_text = (), None, None
    return True


def steps_on_disk(workdir: str) -> list[int]:
  """The checkpoint steps of a workdir, newest first, intact or not."""
  # Unfinished saves (<step>.orbax-checkpoint-tmp) are not checkpoints.
  where = _checkpoint_dir(workdir)
  if not where.exists():
    return []
  return sorted((int(p.name) for p in where.iterdir()
                 if p.name.isdigit() and p.is_dir()), reverse=True)


def find_damage(workdir: str, step: int) -> str | None:
  """What is wrong with one checkpoint's files, or None if nothing is.

  Args:
    workdir: the run's workdir.
    step: a checkpoint step.

  Returns:
    ``'<file, relative to the checkpoint>: <what is wrong>'`` for the first
    damaged file found (``checkpoint_damage.find``), or None.
  """
  return checkpoint_damage.find(_checkpoint_dir(workdir) / str(step))


def _check_intact(workdir: str, step: int) -> None:
  """Raises a `DamagedCheckpointError` naming the bad file, if there is one."""
  damage = find_damage(workdir, step)
  if damage:
    others = [s for s in steps_on_disk(workdir) if s != step]
    raise DamagedCheckpointError(
        f'Checkpoint {step} in {_checkpoint_dir(workdir)} is damaged: '
        f'{damage}. Other checkpoints there: {others or "none"}.')


def resume_step(workdir: str, manager: ocp.CheckpointManager, *,
                strict: bool) -> int | None:
  """The checkpoint to resume from: the newest one that is not damaged.

  Each damaged newer one is logged in one line naming the step and the file,
  and moved to ``workdir/damaged_checkpoints`` (so that the resumed run can
  save its step again), with a warning.

  Args:
    workdir: the run's workdir.
    manager: its checkpoint manager (reloaded after a move).
    strict: refuse to pass over a damaged checkpoint
      (``config.train.strict_resume``).

  Returns:
    The step, or None when the workdir holds no checkpoint at all.

  Raises:
    DamagedCheckpointError: the newest is damaged and ``strict``, or every
      checkpoint is damaged (never a silent start from scratch).
  """
  where = _checkpoint_dir(workdir)
  damaged = []
  for step in steps_on_disk(workdir):
    damage = find_damage(workdir, step)
    if damage is None:
      break
    logging.error('Checkpoint %d in %s is damaged: %s', step, where, damage)
    if strict:
      raise DamagedCheckpointError(
          f'Checkpoint {step} in {where} is damaged: {damage}. '
          'train.strict_resume is set, so not falling back to an older '
          'checkpoint; unset it to resume from the newest intact one.')
    damaged.append(step)
  else:
    if damaged:
      raise DamagedCheckpointError(
          f'Every checkpoint in {where} ({damaged}) is damaged (see the '
          'log); not starting from scratch over them. Move that directory '
          'away to start a new run in this workdir.')
    return None
  if damaged:
    logging.warning('FALLING BACK to checkpoint %d: the newer %s damaged; '
                    'training repeats the steps after it.', step, damaged)
    _set_aside(workdir, damaged)
    manager.reload()
  return step


def _set_aside(workdir: str, steps: list[int]) -> None:
  """Moves damaged checkpoints out of Orbax's sight, into `DAMAGED_DIR`."""
  multiprocess = jax.process_count() > 1
  if multiprocess:  # every process has looked before process 0 moves them
    multihost_utils.sync_global_devices('vgg_jax_damaged_checkpoints_found')
  if jax.process_index() == 0:
    target_dir = paths.absolute(workdir) / DAMAGED_DIR
    target_dir.mkdir(parents=True, exist_ok=True)
    for step in steps:
      target = target_dir / str(step)
      if target.exists():  # damaged once before
        target = target_dir / f'{step}-{time.strftime("%Y%m%d-%H%M%S")}'
      (_checkpoint_dir(workdir) / str(step)).rename(target)
      logging.warning('Moved damaged checkpoint %d to %s.', step, target)
  if multiprocess:
    multihost_utils.sync_global_devices('vgg_jax_damaged_checkpoints_moved')


def save_failure(workdir: str, step: int,
                 error: BaseException) -> CheckpointSaveError:
  """The error for a failed save of ``step``: the cause, what is left."""
  older = [s for s in steps_on_disk(workdir) if s < step]
  return CheckpointSaveError(
      f'Saving checkpoint {step} in {_checkpoint_dir(workdir)} failed: '
      f'{checkpoint_damage.error_summary(error)}. The newest complete checkpoint is '
      f'{older[0] if older else "none"}; a rerun resumes from it once the '
      'cause (a full disk, a lost peer process...) is fixed.')
