"""Training: the paper's recipe as a resumable loop around the jitted step.

``train_and_evaluate(config, workdir)`` is the whole job, in named steps of a
``Trainer``: create the state (``steps.create_train_state``, with the layers
of ``train.init_from`` for a new run), restore or start, the train-step loop,
validate (driving the plateau schedule), save. It checkpoints every
``checkpoint_every_steps``, at each validation, on SIGTERM and at the end.

Faults: a damaged newest checkpoint is reported (step and file), set aside
and passed over for the newest intact one, unless ``train.strict_resume``;
a save that fails (a full disk) stops the run with a
``checkpointing.CheckpointSaveError`` naming the step and the cause.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from clu import periodic_actions
from flax import traverse_util

from vgg_jax import architectures
from vgg_jax import checkpoint_damage
from vgg_jax import checkpointing
from vgg_jax import finetune
from vgg_jax import input_pipeline
from vgg_jax import models
from vgg_jax import optim
from vgg_jax import paths
from vgg_jax import preprocessing
from vgg_jax import sharding
from vgg_jax import steps
from vgg_jax import weights

# The eval batch entries the eval step reads (the iterator adds others).
_EVAL_KEYS = ('image', 'label', 'mask', 'valid_size')


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


class _Preemption:
  """Turns SIGTERM into a flag checked at step boundaries."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, no preemption save
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint and stopping.')
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _num_steps(config, num_train_examples: int) -> tuple[int, int]:
  steps_per_epoch = max(1, num_train_examples // config.train.batch_size)
  if config.train.max_steps > 0:
    return steps_per_epoch, int(config.train.max_steps)
  return steps_per_epoch, max(1, int(config.train.num_epochs * steps_per_epoch))


def _check_model_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError for a bad model name or option (before any data)."""
  models.parse_name(config.model.name)
  models.ModelOptions.from_config(config.model)
  # The paper's std-0.01 init stalls deeper nets without net A's layers.
  architectures.check_initialisation(config.model.name, config.model.init,
                                     config.train.init_from)


def _check_config(config, info, num_devices: int) -> None:
  """Raises a ValueError naming the first setting that cannot train."""
  for field in ('batch_size', 'eval_batch_size'):
    if config.train[field] % num_devices:
      raise ValueError(
          f'train.{field}={config.train[field]} is not divisible by the '
          f'{num_devices} devices.')
  if config.model.num_classes != info.num_classes:
    raise ValueError(
        f'model.num_classes={config.model.num_classes} but dataset '
        f'{config.data.dataset!r} has {info.num_classes} classes.')
  crop, k = config.input.crop_size, config.model.fc6_kernel
  if crop != 32 * k:
    raise ValueError(
        f'input.crop_size={crop} needs model.fc6_kernel={crop // 32} '
        f'(crop / 32) for 1x1 training score maps; got {k}.')
  preprocessing.check_scale(config.input.eval_scales[0], crop,
                            'Validation scale (input.eval_scales[0])')


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as ``{'train.batch_size': 256, ...}`` for TensorBoard."""
  flat = traverse_util.flatten_dict(config.to_dict(), sep='.')
  return {k: v if isinstance(v, (int, float, str, bool)) else str(v)
          for k, v in flat.items()}


class Trainer:
  """One invocation of ``train_and_evaluate`` on a workdir.

  Holds what the named steps share: the mesh, the dataset, the checkpoint
  manager, the metric writer, the plateau schedule, the training iterator,
  the train state and its compiled steps.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    _check_model_config(config)
    self.config = config
    self.workdir = str(paths.absolute(workdir))
    self.mesh = sharding.create_mesh()
    self.info = input_pipeline.get_dataset_info(config)
    _check_config(config, self.info, jax.device_count())
    self.steps_per_epoch, self.total_steps = _num_steps(
        config, self.info.num_examples[config.data.train_split])
    self.is_host0 = jax.process_index() == 0
    self.writer = metric_writers.create_default_writer(
        self.workdir, just_logging=not self.is_host0, asynchronous=True)
    self.manager = checkpointing.create_manager(self.workdir, config)
    self.train_iter = input_pipeline.create_train_iterator(config)
    self.source_shape = (input_pipeline.source_image_shape(config)
                         if config.input.augment_on_device else None)
    self.plateau = optim.Plateau.from_config(config)
    self.lr_at = optim.base_schedule(config, self.steps_per_epoch,
                                     self.total_steps)
    self.last_val: dict[str, float] = {}
    self.history: list[tuple[int, float]] = []  # (step, mean loss) per log
    self._pending_losses: list[tuple[int, jax.Array]] = []
    self._save_in_flight: int | None = None
    self.setup: steps.TrainSetup | None = None
    self.state: steps.TrainState | None = None
    self.train_step = self.eval_step = None  # compiled by restore_or_start
    self.step = 0

  def restore_or_start(self) -> None:
    """Creates the state and restores the newest intact checkpoint, if any.

    Raises:
      checkpointing.CheckpointMismatchError: the workdir's checkpoint was
        written for another model (checked before any array is read, so a
        mismatch never partially loads).
      checkpointing.DamagedCheckpointError: the newest checkpoint is damaged
        and ``train.strict_resume`` is set, every checkpoint is damaged, or
        restoring failed.
    """
    resume_step = checkpointing.resume_step(
        self.workdir, self.manager,
        strict=self.config.train.strict_resume)
    meta = None
    if resume_step is not None:
      _, meta = checkpointing.read_meta(self.workdir, resume_step)
      checkpointing.check_compatible(meta['model'], self.config, self.workdir)
    init_weights = None
    if self.config.train.init_from:
      # The input the init weights expect; once resumed, as the run's own
      # checkpoint recorded it (the init_from dir may be gone by then).
      source = self.config.train.init_from
      recorded, where = ((meta, self.workdir) if meta is not None else
                         (weights.source_metadata(source), source))
      self.config = finetune.source_normalization(self.config, recorded,
                                                  where)
    if resume_step is None and self.config.train.init_from:
      init_weights = functools.partial(weights.init_from, config=self.config)
    self.setup, self.state = steps.create_train_state(
        self.config, self.mesh, init_weights=init_weights)
    if resume_step is None:
      self._start()
    else:
      self._restore(resume_step, meta)
    self.train_step = steps.BackgroundCompiled(
        steps.jit_train_step(self.setup, self.config),
        self.setup.abstract(self.state),
        steps.train_batch_spec(self.config, self.source_shape),
        jax.ShapeDtypeStruct((), jnp.float32))
    self.eval_step = steps.jit_eval_step(self.setup, self.config)
    self.step = int(jax.device_get(self.state.step))

  def _start(self) -> None:
    checkpointing.write_config(self.workdir, self.config)
    if self.is_host0:
      self.writer.write_hparams(_flat_hparams(self.config))

  def _restore(self, step: int, meta: dict[str, Any]) -> None:
    try:
      restored = self.manager.restore(step, args=checkpointing.restore_args(
          self.setup.abstract(self.state), self.train_iter))
    except Exception as e:  # pylint: disable=broad-except
      # Files that pass find_damage's checks but do not restore (corrupt
      # bytes, another optimiser or data-loader setup): no fallback, as the
      # cause may apply to every checkpoint; one line naming it.
      raise checkpointing.DamagedCheckpointError(
          f'Checkpoint {step} in {self.manager.directory} could not be '
          f'restored: {checkpoint_damage.error_summary(e)}') from e
    self.state = restored['state']
    self.plateau.load_state_dict(meta['plateau'])
    self.last_val = meta.get('val') or {}
    logging.info('Resumed from %s at step %d.', self.manager.directory, step)

  def meta(self, step: int) -> dict[str, Any]:
    """The JSON metadata saved with the checkpoint of ``step``."""
    config = self.config
    return dict(step=step, model=dict(config.model),
                dataset=config.data.dataset, plateau=self.plateau.state_dict(),
                seed=config.seed, val=self.last_val,
                normalization=config.input.normalization,
                mean_rgb=list(config.input.mean_rgb),
                class_names=list(self.info.class_names or []))

  def check_losses(self) -> None:
    """Raises NonFiniteLossError if a loss since the last check was NaN/inf.

    Losses stay on the device until here, so steps are not synchronised one
    by one; this runs before every save, so a bad step is never saved.
    """
    for step, loss in self._pending_losses:
      if not np.isfinite(float(loss)):
        raise NonFiniteLossError(
            f'Non-finite training loss ({float(loss)}) at step {step}; '
            f'stopping. The last good checkpoint in {self.manager.directory} '
            f'is kept (step {self.manager.latest_step()}).')
    self._pending_losses.clear()

  def save(self, step: int, metrics: dict[str, float] | None = None,
           force: bool = False) -> None:
    """Checks the losses, then saves state, metadata and iterator (async).

    Raises:
      checkpointing.CheckpointSaveError: this save or the one before failed.
    """
    self.check_losses()
    self.wait_for_saves()  # an earlier save's failure, under its own step
    with self._saving(step):
      self.manager.save(step, args=checkpointing.save_args(
          self.state, self.meta(step), self.train_iter),
                        metrics=metrics, force=force)
    self._save_in_flight = step

  def wait_for_saves(self) -> None:
    """Waits for the save in flight; a CheckpointSaveError if it failed."""
    step, self._save_in_flight = self._save_in_flight, None
    if step is not None:
      with self._saving(step):
        self.manager.wait_until_finished()

  @contextlib.contextmanager
  def _saving(self, step: int):
    """Turns any failure of saving ``step`` into one CheckpointSaveError."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      # Orbax and TensorStore raise OSError, ValueError or plain Exception
      # for a full disk; the error quotes the cause.
      raise checkpointing.save_failure(self.workdir, step, e) from e

  def validate(self, step: int) -> dict[str, float]:
    """Loss, top-1 and top-5 on the validation split at the first test scale."""
    scale = self.config.input.eval_scales[0]
    mode = ('full' if self.config.input.eval_protocol == 'dense'
            else 'center_crop')
    sums, t0 = None, time.monotonic()
    for local in input_pipeline.create_eval_iterator(self.config, scale=scale,
                                                     mode=mode):
      batch = sharding.global_batch(
          {k: v for k, v in local.items() if k in _EVAL_KEYS}, self.mesh)
      out = self.eval_step(self.state, batch)
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    sums = jax.device_get(sums)
    n = max(float(sums['count']), 1.0)
    result = dict(val_loss=float(sums['loss']) / n,
                  val_top1=float(sums['top1']) / n,
                  val_top5=float(sums['top5']) / n,
                  val_count=float(sums['count']))
    self.writer.write_scalars(step, result)
    logging.info('step %d validation (Q=%d, %s): top-1 %.4f top-5 %.4f loss '
                 '%.4f over %d examples in %.1f s', step, scale, mode,
                 result['val_top1'], result['val_top5'], result['val_loss'],
                 int(n), time.monotonic() - t0)
    return result

  def run(self) -> dict[str, Any]:
    """Trains to ``total_steps`` (or a stop); returns the summary."""
    logging.info('Training %s on %s: %d steps (%d per epoch), batch %d over '
                 '%d devices in %d processes.', self.config.model.name,
                 self.config.data.dataset, self.total_steps,
                 self.steps_per_epoch, self.config.train.batch_size,
                 jax.device_count(), jax.process_count())
    hooks = self._hooks()
    with _Preemption() as preemption:
      stopped = self._loop(preemption, hooks)
    return self._finish(stopped)

  def _hooks(self) -> list[periodic_actions.PeriodicAction]:
    hooks = [periodic_actions.ReportProgress(
        num_train_steps=self.total_steps, writer=self.writer, every_secs=60)]
    if self.config.train.profile_steps > 0 and self.is_host0:
      hooks.append(periodic_actions.Profile(
          logdir=self.workdir,
          num_profile_steps=self.config.train.profile_steps,
          first_profile=self.step + 10, every_secs=None, every_steps=10 ** 9))
    return hooks

  def _loop(self, preemption: _Preemption, hooks) -> str:
    """The train-step loop; returns ``done``, ``plateau`` or ``preempted``."""
    train = self.config.train
    window = steps.MetricsWindow()
    while self.step < self.total_steps:
      lr = self._train_one_step(window)
      step, last = self.step, self.step == self.total_steps
      for hook in hooks:
        hook(step)
      if step % train.log_every_steps == 0 or last:
        self._log(window, lr)
      if step % train.eval_every_steps == 0 or last:
        # Training throughput leaves validation out (it logs its own time);
        # the last step's compute, still running, stays in.
        jax.block_until_ready(self.state)
        t0 = time.monotonic()
        stop = self._validate_and_save()
        window.exclude(time.monotonic() - t0)
        if stop:
          return 'plateau'
      elif step % train.checkpoint_every_steps == 0:
        self.save(step)
      if preemption.requested or (
          jax.process_count() > 1 and self.manager.reached_preemption(step)):
        if self.manager.latest_step() != step:
          self.save(step, force=True)
        return 'preempted'
    return 'done'

  def _train_one_step(self, window: steps.MetricsWindow) -> float:
    """Reads a batch and takes one step; returns the learning rate used."""
    t0 = time.monotonic()
    local = next(self.train_iter)
    data_wait = time.monotonic() - t0
    batch = sharding.global_batch(
        {k: v for k, v in local.items() if k != 'skipped'}, self.mesh)
    lr = self.lr_at(self.step) * self.plateau.scale
    compiling = self.train_step.waited
    self.state, metrics, loss = self.train_step(self.state, batch,
                                                np.float32(lr))
    compiling = self.train_step.waited - compiling
    if compiling:
      # Start-up, not throughput: logged apart, with the wait for this first
      # batch, which was read while the step compiled in the background.
      window.exclude(compiling + data_wait)
      logging.info('Waited %.1f s for the train step\'s compilation (and '
                   'before it %.1f s for the first batch, read meanwhile).',
                   compiling, data_wait)
      data_wait = 0.0
    self.step += 1
    window.add(metrics, self.config.train.batch_size, data_wait,
               int(np.sum(local.get('skipped', 0))))
    self._pending_losses.append((self.step, loss))
    return lr

  def _log(self, window: steps.MetricsWindow, lr: float) -> None:
    self.check_losses()
    scalars = window.scalars(lr)
    self.writer.write_scalars(self.step, scalars)
    self.history.append((self.step, scalars['train_loss']))
    logging.info('step %d/%d: loss %.4f top-1 %.4f lr %.2g %.0f img/s '
                 '(data wait %.0f%%)', self.step, self.total_steps,
                 scalars['train_loss'], scalars['train_top1'], lr,
                 scalars['images_per_sec'],
                 100 * scalars['data_wait_fraction'])
    window.reset()

  def _validate_and_save(self) -> bool:
    """Validates, updates the plateau schedule, saves; True: stop now."""
    step = self.step
    self.last_val = self.validate(step)
    action = (self.plateau.update(self.last_val['val_top1'])
              if self.config.train.schedule == 'plateau' else 'improved')
    if action == 'dropped':
      logging.info('Validation top-1 plateaued: learning rate x%g (drop %d of '
                   '%d).', self.plateau.factor, self.plateau.drops,
                   self.plateau.max_drops)
    self.save(step, metrics=dict(self.last_val), force=True)
    if action == 'exhausted' and self.config.train.stop_after_max_drops:
      logging.info('Plateau after the last of %d drops: stopping at step %d.',
                   self.plateau.max_drops, step)
      return True
    return False

  def _finish(self, stopped: str) -> dict[str, Any]:
    """Saves the last step if not saved yet, waits for it, and summarises."""
    self.check_losses()
    if self.manager.latest_step() != self.step:
      self.save(self.step, force=True)
    self.wait_for_saves()
    logging.info('Finished at step %d (%s).', self.step, stopped)
    return dict(step=self.step, stopped=stopped,
                train_loss_history=self.history,
                learning_rate=(self.lr_at(max(self.step - 1, 0)) *
                               self.plateau.scale),
                **self.last_val)

  def close(self, *, quiet: bool = False) -> None:
    """Finishes pending saves and closes the manager and the writer.

    Also after an error: a save already started (the last good checkpoint
    before a non-finite loss) completes.

    Args:
      quiet: only log a failure of the pending save (another error is on its
        way up and is the news).
    """
    try:
      self.wait_for_saves()
      self.manager.close()
    except Exception as e:  # pylint: disable=broad-except
      if not quiet:
        raise
      logging.error('While stopping: %s', checkpoint_damage.error_summary(e))
    finally:
      self.writer.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> dict[str, Any]:
  """Trains (or resumes) a VGG net and evaluates it periodically.

  Args:
    config: the run config (see ``vgg_jax/configs/base.py``).
    workdir: where checkpoints, ``config.json`` and TensorBoard logs go; a
      run restarted on the same workdir resumes from its latest checkpoint.

  Returns:
    A summary: ``step``, ``val_top1``, ``val_top5``, ``val_loss`` of the last
    validation, ``learning_rate``, ``train_loss_history`` (``(step, loss)``
    per logging period of this invocation), ``stopped`` (``'done'``,
    ``'plateau'`` or ``'preempted'``).

  Raises:
    NonFiniteLossError: the loss became NaN/inf; the last good checkpoint is
      kept.
    checkpointing.CheckpointMismatchError: the workdir's checkpoint was
      written for another model.
    checkpointing.DamagedCheckpointError: no checkpoint to resume from
      although the workdir holds some, or a strict resume over a damaged one.
    checkpointing.CheckpointSaveError: a checkpoint could not be written;
      the ones before it are intact.
    ValueError: a config value that cannot train (named in the message).
  """
  trainer = Trainer(config, workdir)
  try:
    trainer.restore_or_start()
    summary = trainer.run()
  except BaseException:
    trainer.close(quiet=True)
    raise
  trainer.close()
  return summary
