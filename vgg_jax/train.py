"""Training: the paper's recipe as a jitted, sharded step and a resumable loop.

``train_and_evaluate(config, workdir)`` is the whole job: it builds the mesh,
the model (randomly or from ``train.init_from``), the optimiser and the Grain
input pipeline; resumes from the latest checkpoint in ``workdir``; trains with
periodic validation driving the plateau schedule; and checkpoints every
``checkpoint_every_steps``, at each validation, on SIGTERM and at the end.
"""

import signal
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metrics as clu_metrics
from flax import nnx

from vgg_jax import checkpointing
from vgg_jax import models
from vgg_jax import optim
from vgg_jax import preprocessing
from vgg_jax import sharding


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  """Per-step training metrics, averaged over the logging period."""
  loss: clu_metrics.Average.from_output('loss')
  top1: clu_metrics.Average.from_output('top1')
  top5: clu_metrics.Average.from_output('top5')


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """Per-example 1.0 where the label is among the k highest scores."""
  k = min(k, logits.shape[-1])
  label_score = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  # Rank = number of classes scoring strictly higher than the label.
  rank = (logits > label_score).sum(axis=-1)
  return (rank < k).astype(jnp.float32)


def split_model(model: nnx.Module):
  """``(graphdef, params, batch_stats, rest)`` of a model."""
  return nnx.split(model, nnx.Param, nnx.BatchStat, ...)


def make_train_step(graphdef, rest, tx, normalize: Callable, seed: int):
  """The pure training step: forward, backward, SGD update.

  Args:
    graphdef: the model's graph definition in training mode.
    rest: model state other than params and BN statistics (RNG streams).
    tx: the Optax chain from ``optim.create_optimizer``.
    normalize: uint8 images -> normalised float32 on device.
    seed: base seed; dropout uses ``fold_in(seed, step)``, so it is the same
      for a resumed run and across device counts.

  Returns:
    ``step(state, batch, learning_rate) -> (state, metrics, loss)``.
  """
  def train_step(state, batch, learning_rate):
    key = jax.random.fold_in(jax.random.key(seed), state['step'])

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state['batch_stats'], rest,
                         copy=True)
      logits = model(normalize(batch['image']), rngs=nnx.Rngs(dropout=key))
      loss = optim.cross_entropy(logits, batch['label']).mean()
      return loss, (logits, nnx.state(model, nnx.BatchStat))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optim.apply_updates(state['params'], updates, learning_rate)
    new_state = dict(step=state['step'] + 1, params=params,
                     batch_stats=batch_stats, opt_state=opt_state)
    metrics = TrainMetrics.single_from_model_output(
        loss=loss, top1=topk_correct(logits, batch['label'], 1).mean(),
        top5=topk_correct(logits, batch['label'], 5).mean())
    return new_state, metrics, loss
  return train_step


def make_eval_step(graphdef, rest, normalize: Callable):
  """Sums of loss, top-1 and top-5 hits over the unmasked examples."""
  def eval_step(state, batch):
    model = nnx.merge(graphdef, state['params'], state['batch_stats'], rest,
                      copy=True)
    valid_size = batch.get('valid_size')
    logits = model(normalize(batch['image']), valid_size=valid_size)
    mask = batch['mask'].astype(jnp.float32)
    return dict(
        loss=(optim.cross_entropy(logits, batch['label']) * mask).sum(),
        top1=(topk_correct(logits, batch['label'], 1) * mask).sum(),
        top5=(topk_correct(logits, batch['label'], 5) * mask).sum(),
        count=mask.sum())
  return eval_step


def _normalizer(config: ml_collections.ConfigDict) -> Callable:
  def normalize(images):
    return preprocessing.normalize(images, config.input.normalization,
                                   mean_rgb=tuple(config.input.mean_rgb))
  return normalize


def init_from(model: models.VGG, config: ml_collections.ConfigDict) -> list[str]:
  """Copies layers from ``config.train.init_from`` into ``model`` in place.

  A checkpoint of the same architecture is copied whole (the paper's
  S=256 -> S=384 -> multi-scale fine-tuning chain). A net-A (``vgg11``)
  checkpoint into a deeper net copies A's four conv layers block by block
  (A's block b, conv i -> block b, conv i; Sec. 3.1) and the three FC layers;
  everything else keeps its random initialisation.

  Args:
    model: the freshly initialised model.
    config: the run config.

  Returns:
    The names of the copied layers.

  Raises:
    CheckpointMismatchError: different architectures other than A -> deeper,
      or any shape mismatch.
  """
  path = config.train.init_from
  params, stats, meta = checkpointing.load_variables(path, 'latest')
  src_name = meta['model']['name']
  src_arch, src_bn = models.parse_name(src_name)
  dst_arch = model.architecture
  same = src_name == config.model.name
  if not same and (src_arch.config != 'A' or src_bn != model.batch_norm):
    raise checkpointing.CheckpointMismatchError(
        f'init_from={path!r} holds {src_name}; it can initialise only the same '
        f'architecture or, if it is net A (vgg11{"_bn" if model.batch_norm else ""}), '
        f'a deeper net; the config asks for {config.model.name}.')
  target = nnx.state(model, nnx.Param).to_pure_dict()
  target_stats = nnx.state(model, nnx.BatchStat).to_pure_dict()
  if same:
    layers = ([f'blocks.{b}.convs.{i}' for b, blk in enumerate(dst_arch.blocks)
               for i in range(len(blk))] + ['fc6', 'fc7', 'fc8'])
  else:
    layers = [f'blocks.{b}.convs.{i}' for b, blk in enumerate(src_arch.blocks)
              for i in range(len(blk))][:4] + ['fc6', 'fc7', 'fc8']
  copied = []
  for layer in layers:
    _copy_layer(params, target, layer, path)
    if model.batch_norm and layer.startswith('blocks'):
      norm = layer.replace('convs', 'norms')
      _copy_layer(params, target, norm, path)
      _copy_layer(stats, target_stats, norm, path)
    copied.append(layer)
  nnx.update(model, checkpointing.state_from_pure(
      nnx.state(model, nnx.Param), target))
  if target_stats:
    nnx.update(model, checkpointing.state_from_pure(
        nnx.state(model, nnx.BatchStat), target_stats))
  logging.info('init_from %s (%s, step %s): copied %s; the rest is random.',
               path, src_name, meta.get('step'), ', '.join(copied))
  return copied


def _lookup(tree: dict, dotted: str):
  node = tree
  for part in dotted.split('.'):
    key = int(part) if part.isdigit() else part
    if key not in node and str(key) in node:
      key = str(key)
    node = node[key]
  return node


def _copy_layer(src: dict, dst: dict, layer: str, where: str) -> None:
  try:
    s = _lookup(src, layer)
  except KeyError:
    raise checkpointing.CheckpointMismatchError(
        f'init_from {where}: layer {layer} is missing.') from None
  d = _lookup(dst, layer)
  for name in d:
    if name not in s:
      raise checkpointing.CheckpointMismatchError(
          f'init_from {where}: {layer}.{name} is missing.')
    if tuple(np.shape(s[name])) != tuple(np.shape(d[name])):
      raise checkpointing.CheckpointMismatchError(
          f'init_from {where}: {layer}.{name} has shape {np.shape(s[name])}, '
          f'the model wants {np.shape(d[name])}.')
    d[name] = jnp.asarray(s[name], d[name].dtype)


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


def _check_config(config, info, num_devices: int) -> None:
  if config.train.batch_size % num_devices:
    raise ValueError(
        f'train.batch_size={config.train.batch_size} is not divisible by the '
        f'{num_devices} devices.')
  if config.train.eval_batch_size % num_devices:
    raise ValueError(
        f'train.eval_batch_size={config.train.eval_batch_size} is not '
        f'divisible by the {num_devices} devices.')
  if config.model.num_classes != info.num_classes:
    raise ValueError(
        f'model.num_classes={config.model.num_classes} but dataset '
        f'{config.data.dataset!r} has {info.num_classes} classes.')
  crop, k = config.input.crop_size, config.model.fc6_kernel
  if crop != 32 * k:
    raise ValueError(
        f'input.crop_size={crop} needs model.fc6_kernel={crop // 32} '
        f'(crop / 32) for 1x1 training score maps; got {k}.')


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
    per logging period of this invocation), ``stopped`` (``'done'``, ``'plateau'`` or
    ``'preempted'``).

  Raises:
    NonFiniteLossError: the loss became NaN/inf; the last good checkpoint is
      kept.
    checkpointing.CheckpointMismatchError: the workdir's checkpoint was
      written for another model.
  """
  # Imported here so the step functions above need neither TensorFlow (clu's
  # writers import it) nor Grain/TFDS: a bare accelerator host can run them.
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  from vgg_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  workdir = checkpointing.absolute(workdir)
  mesh = sharding.create_mesh()
  info = input_pipeline.get_dataset_info(config)
  _check_config(config, info, jax.device_count())
  steps_per_epoch, total_steps = _num_steps(
      config, info.num_examples[config.data.train_split])
  is_host0 = jax.process_index() == 0
  writer = metric_writers.create_default_writer(
      workdir, just_logging=not is_host0, asynchronous=True)

  # Model, created directly with its final sharding.
  shard = config.train.shard_params

  def build():
    return models.create_model(
        config.model.name, rngs=nnx.Rngs(params=config.seed,
                                         dropout=config.seed + 1),
        **checkpointing.model_options(config))

  abstract = nnx.eval_shape(build)
  model_shd = sharding.tree_shardings(nnx.state(abstract), mesh, shard)

  @nnx.jit
  def create_sharded():
    m = build()
    nnx.update(m, jax.lax.with_sharding_constraint(nnx.state(m), model_shd))
    return m
  model = create_sharded()
  _, params, _, _ = split_model(model)

  tx = optim.create_optimizer(config, params)
  opt_shd = sharding.tree_shardings(jax.eval_shape(tx.init, params), mesh, shard)
  manager = checkpointing.create_manager(workdir, config)
  train_iter = input_pipeline.create_train_iterator(config)
  plateau = optim.Plateau.from_config(config)
  lr_at = optim.base_schedule(config, steps_per_epoch, total_steps)

  resume_step = manager.latest_step()
  if resume_step is None and config.train.init_from:
    init_from(model, config)
  model.train()
  graphdef, params, batch_stats, rest = split_model(model)
  state = dict(step=jnp.zeros((), jnp.int32), params=params,
               batch_stats=batch_stats,
               opt_state=jax.jit(tx.init, out_shardings=opt_shd)(params))
  state_shd = dict(step=sharding.replicated(mesh),
                   params=jax.tree.map(lambda x: x.sharding, params),
                   batch_stats=jax.tree.map(lambda x: x.sharding, batch_stats),
                   opt_state=opt_shd)
  last_val: dict[str, float] = {}
  if resume_step is not None:
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        state, state_shd)
    # Check the model before touching arrays: a mismatch must be our error,
    # not a shape error deep inside Orbax, and must never partially load.
    _, meta = checkpointing.read_meta(workdir, resume_step)
    checkpointing.check_compatible(meta['model'], config, workdir)
    restored = manager.restore(resume_step, args=checkpointing.restore_args(
        abstract_state, train_iter))
    state = restored['state']
    plateau.load_state_dict(meta['plateau'])
    last_val = meta.get('val') or {}
    logging.info('Resumed from %s at step %d.', manager.directory, resume_step)
  else:
    checkpointing.write_config(workdir, config)
    if is_host0:
      writer.write_hparams(_flat_hparams(config))

  normalize = _normalizer(config)
  batch_shd = sharding.batch_sharding(mesh)
  train_step = jax.jit(
      make_train_step(graphdef, rest, tx, normalize, config.seed),
      in_shardings=(state_shd, batch_shd, None),
      out_shardings=(state_shd, None, None), donate_argnums=(0,))
  model.eval()
  eval_graphdef = nnx.split(model)[0]
  eval_step = jax.jit(make_eval_step(eval_graphdef, rest, normalize),
                      in_shardings=(state_shd, batch_shd))

  def meta_for(step: int) -> dict[str, Any]:
    return dict(step=step, model=dict(config.model),
                dataset=config.data.dataset, plateau=plateau.state_dict(),
                seed=config.seed, val=last_val,
                normalization=config.input.normalization,
                mean_rgb=list(config.input.mean_rgb),
                class_names=list(info.class_names or []))

  pending_losses: list[tuple[int, jax.Array]] = []

  def check_losses():
    for s, loss in pending_losses:
      if not np.isfinite(float(loss)):
        raise NonFiniteLossError(
            f'Non-finite training loss ({float(loss)}) at step {s}; stopping. '
            f'The last good checkpoint in {manager.directory} is kept '
            f'(step {manager.latest_step()}).')
    pending_losses.clear()

  def save(step: int, metrics=None, force=False):
    check_losses()
    manager.save(step, args=checkpointing.save_args(state, meta_for(step),
                                                    train_iter),
                 metrics=metrics, force=force)

  def validate(step: int) -> dict[str, float]:
    sums = None
    scale = config.input.eval_scales[0]
    mode = 'full' if config.input.eval_protocol == 'dense' else 'center_crop'
    for local in input_pipeline.create_eval_iterator(config, scale=scale,
                                                     mode=mode):
      out = eval_step(state, sharding.global_batch(
          {k: v for k, v in local.items() if k in (
              'image', 'label', 'mask', 'valid_size')}, mesh))
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    sums = jax.device_get(sums)
    n = max(float(sums['count']), 1.0)
    result = dict(val_loss=float(sums['loss']) / n,
                  val_top1=float(sums['top1']) / n,
                  val_top5=float(sums['top5']) / n,
                  val_count=float(sums['count']))
    writer.write_scalars(step, result)
    logging.info('step %d validation (Q=%d, %s): top-1 %.4f top-5 %.4f loss '
                 '%.4f over %d examples', step, scale, mode,
                 result['val_top1'], result['val_top5'], result['val_loss'],
                 int(n))
    return result

  step = int(jax.device_get(state['step']))
  report = periodic_actions.ReportProgress(num_train_steps=total_steps,
                                           writer=writer, every_secs=60)
  hooks = [report]
  if config.train.profile_steps > 0 and is_host0:
    hooks.append(periodic_actions.Profile(
        logdir=workdir, num_profile_steps=config.train.profile_steps,
        first_profile=step + 10, every_secs=None, every_steps=10 ** 9))
  train_metrics = None
  window_start, data_wait, window_images, skipped = time.monotonic(), 0.0, 0, 0
  stopped = 'done'
  history: list[tuple[int, float]] = []  # (step, mean train loss) per log
  logging.info('Training %s on %s: %d steps (%d per epoch), batch %d over %d '
               'devices in %d processes.', config.model.name,
               config.data.dataset, total_steps, steps_per_epoch,
               config.train.batch_size, jax.device_count(),
               jax.process_count())
  with _Preemption() as preemption:
    while step < total_steps:
      t0 = time.monotonic()
      local = next(train_iter)
      data_wait += time.monotonic() - t0
      skipped += int(np.sum(local.get('skipped', 0)))
      batch = sharding.global_batch(
          {'image': local['image'], 'label': local['label']}, mesh)
      lr = lr_at(step) * plateau.scale
      state, metrics, loss = train_step(state, batch, np.float32(lr))
      step += 1
      window_images += config.train.batch_size
      pending_losses.append((step, loss))
      train_metrics = metrics if train_metrics is None else train_metrics.merge(
          metrics)
      for hook in hooks:
        hook(step)

      if step % config.train.log_every_steps == 0 or step == total_steps:
        check_losses()
        elapsed = max(time.monotonic() - window_start, 1e-9)
        scalars = {f'train_{k}': float(v)
                   for k, v in train_metrics.compute().items()}
        scalars.update(
            learning_rate=lr, images_per_sec=window_images / elapsed,
            images_per_sec_per_device=window_images / elapsed /
            jax.device_count(),
            data_wait_fraction=data_wait / elapsed, skipped_images=skipped)
        writer.write_scalars(step, scalars)
        history.append((step, scalars['train_loss']))
        logging.info('step %d/%d: loss %.4f top-1 %.4f lr %.2g %.0f img/s '
                     '(data wait %.0f%%)', step, total_steps,
                     scalars['train_loss'], scalars['train_top1'], lr,
                     scalars['images_per_sec'],
                     100 * scalars['data_wait_fraction'])
        train_metrics, window_images, data_wait = None, 0, 0.0
        window_start = time.monotonic()

      if step % config.train.eval_every_steps == 0 or step == total_steps:
        last_val = validate(step)
        action = (plateau.update(last_val['val_top1'])
                  if config.train.schedule == 'plateau' else 'improved')
        if action == 'dropped':
          logging.info('Validation top-1 plateaued: learning rate x%g '
                       '(drop %d of %d).', plateau.factor, plateau.drops,
                       plateau.max_drops)
        save(step, metrics=dict(last_val), force=True)
        if action == 'exhausted' and config.train.stop_after_max_drops:
          logging.info('Plateau after the last of %d drops: stopping at step '
                       '%d.', plateau.max_drops, step)
          stopped = 'plateau'
          break
      elif step % config.train.checkpoint_every_steps == 0:
        save(step)

      if preemption.requested or (
          jax.process_count() > 1 and manager.reached_preemption(step)):
        if manager.latest_step() != step:
          save(step, force=True)
        stopped = 'preempted'
        break
  check_losses()
  if manager.latest_step() != step:
    save(step, force=True)
  manager.wait_until_finished()
  manager.close()
  writer.flush()
  logging.info('Finished at step %d (%s).', step, stopped)
  return dict(step=step, stopped=stopped, train_loss_history=history,
              learning_rate=lr_at(max(step - 1, 0)) * plateau.scale,
              **last_val)


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  flat = {}

  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, ml_collections.ConfigDict):
        walk(v, f'{prefix}{k}.')
      else:
        flat[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
  walk(config, '')
  return flat
