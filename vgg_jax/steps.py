"""The device side of training: the typed train state and the jitted steps.

``create_train_state(config, mesh)`` builds the model directly with its final
sharding, the optimiser, and a ``TrainState`` (step, parameters, BN
statistics, optimiser state); ``jit_train_step`` / ``jit_eval_step`` compile
the pure steps over it; ``MetricsWindow`` sums their metrics between log
lines. Nothing here reads data or writes files, so a bare
accelerator host can run it without TensorFlow or Grain
(``benchmarks/train_step.py`` does); ``vgg_jax.train`` adds the loop.
"""

# No `from __future__ import annotations`: clu's metric collections read
# their fields' annotations as classes at run time.
import concurrent.futures
import dataclasses
import functools
import math
import time
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metrics as clu_metrics
from flax import nnx
from jax.sharding import Mesh

from vgg_jax import device_augment
from vgg_jax import finetune
from vgg_jax import metrics
from vgg_jax import models
from vgg_jax import optim
from vgg_jax import preprocessing
from vgg_jax import sharding

Batch = dict[str, jax.Array]
Normalize = Callable[[jax.Array], jax.Array]
# The trainable-parameter filter of train.freeze='none'.
_ALL = nnx.Everything()


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  """Per-step training metrics, averaged over the logging period."""
  loss: clu_metrics.Average.from_output('loss')
  top1: clu_metrics.Average.from_output('top1')
  top5: clu_metrics.Average.from_output('top5')


class MetricsWindow:
  """Training metrics and throughput since the last log line (host side)."""

  def __init__(self):
    self.skipped = 0  # unreadable images, counted over the whole invocation
    self.reset()

  def reset(self) -> None:
    self.metrics: list[TrainMetrics] = []
    self.images = 0
    self.data_wait = 0.0
    self.start = time.monotonic()

  def exclude(self, seconds: float) -> None:
    """Leaves ``seconds`` (a validation) out of the throughput's time."""
    self.start += seconds

  def add(self, metrics: TrainMetrics, images: int, data_wait: float,
          skipped: int) -> None:
    # Merged when logged: merging each step cost a few eager device ops per
    # step, about 6 ms on the quickstart (BENCHMARKS.md).
    self.metrics.append(metrics)
    self.images += images
    self.data_wait += data_wait
    self.skipped += skipped

  def scalars(self, learning_rate: float) -> dict[str, float]:
    """The window's TensorBoard scalars (``train_loss``, ``images_per_sec``)."""
    elapsed = max(time.monotonic() - self.start, 1e-9)
    merged = functools.reduce(_merge_metrics, self.metrics)
    out = {f'train_{k}': float(v) for k, v in merged.compute().items()}
    out.update(learning_rate=learning_rate,
               images_per_sec=self.images / elapsed,
               images_per_sec_per_device=(self.images / elapsed /
                                          jax.device_count()),
               data_wait_fraction=self.data_wait / elapsed,
               skipped_images=self.skipped)
    return out


@jax.jit
def _merge_metrics(a: TrainMetrics, b: TrainMetrics) -> TrainMetrics:
  return a.merge(b)


@flax.struct.dataclass
class TrainState:
  """What a training step reads and writes, and a checkpoint's ``state``.

  Orbax stores it under the field names, the layout of the plain dict that
  earlier versions saved, so their checkpoints restore into it.

  Attributes:
    step: int32 scalar, steps taken.
    params: the model's ``nnx.Param`` state, frozen parameters included.
    batch_stats: its ``nnx.BatchStat`` state (empty without BN).
    opt_state: the Optax state of ``create_optimizer``, for the trainable
      parameters only.
  """
  step: jax.Array
  params: nnx.State
  batch_stats: nnx.State
  opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """The static pieces around a ``TrainState``.

  Attributes:
    graphdef: the model's graph definition in training mode.
    eval_graphdef: the same in eval mode (no dropout, running BN statistics).
    rest: model state other than params and BN statistics (RNG streams).
    tx: the Optax chain, over the trainable parameters.
    mesh: the device mesh.
    shardings: a ``TrainState`` of ``NamedSharding``s, one per array.
    trainable: the ``nnx`` filter of the parameters that train
      (``finetune.trainable_filter`` of ``train.freeze``).
  """
  graphdef: nnx.GraphDef
  eval_graphdef: nnx.GraphDef
  rest: nnx.State
  tx: optax.GradientTransformation
  mesh: Mesh
  shardings: TrainState
  trainable: Any = _ALL

  def abstract(self, state: TrainState) -> TrainState:
    """``state`` as ``jax.ShapeDtypeStruct``s with their shardings (restore)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        state, self.shardings)


def split_model(model: nnx.Module):
  """``(graphdef, params, batch_stats, rest)`` of a model."""
  return nnx.split(model, nnx.Param, nnx.BatchStat, ...)


def create_model(config: ml_collections.ConfigDict) -> models.VGG:
  """The randomly initialised model of ``config.model`` (``config.seed``)."""
  return models.create_model(
      config.model.name,
      rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1),
      **models.ModelOptions.from_config(config.model).as_dict())


def _model_state(config: ml_collections.ConfigDict) -> nnx.State:
  return nnx.state(create_model(config))


def create_sharded_model(config: ml_collections.ConfigDict,
                         mesh: Mesh) -> models.VGG:
  """``create_model`` with every array created directly with its sharding.

  Compiled with ``models.init_compiler_options``, as ``create_model`` alone
  is: inside this program the initialiser takes the outer program's options,
  and XLA:CPU's default optimisation of it cost the quickstart 3 s of
  start-up.

  Args:
    config: the run config (``train.shard_params`` chooses FSDP-style
      splitting over replication, see ``vgg_jax.sharding``).
    mesh: the device mesh.
  """
  graphdef, abstract = nnx.split(
      nnx.eval_shape(functools.partial(create_model, config)))
  shardings = sharding.tree_shardings(abstract, mesh,
                                      config.train.shard_params)
  size = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))
  initialise = jax.jit(functools.partial(_model_state, config),
                       out_shardings=shardings).lower().compile(
                           compiler_options=models.init_compiler_options(size))
  return nnx.merge(graphdef, initialise())


def create_train_state(
    config: ml_collections.ConfigDict, mesh: Mesh, *,
    init_weights: Callable[[models.VGG], Any] | None = None,
) -> tuple[TrainSetup, TrainState]:
  """A fresh model, optimiser and train state, sharded over ``mesh``.

  Args:
    config: the run config.
    mesh: the device mesh (``sharding.create_mesh()``).
    init_weights: called on the freshly initialised model before it is
      split, to overwrite weights in place (``train`` passes
      ``weights.init_from`` for a new run with ``train.init_from``); it may
      return the names of the layers it copied (``finetune.layer_of``), the
      others then count as new for ``train.new_layers_lr_mult``.

  Returns:
    ``(setup, state)``; ``state.step`` is 0.

  Raises:
    ValueError: a bad ``train.freeze`` or ``train.new_layers_lr_mult``.
  """
  freeze = finetune.check_freeze(config.train.get('freeze', 'none'))
  trainable_filter = finetune.trainable_filter(freeze)
  model = create_sharded_model(config, mesh)
  copied = init_weights(model) if init_weights is not None else None
  model.train()
  finetune.freeze_batch_norms(model, freeze)
  graphdef, params, batch_stats, rest = split_model(model)
  model.eval()
  eval_graphdef = nnx.split(model)[0]
  trainable, _ = finetune.split_trainable(params, trainable_filter)
  tx = create_optimizer(config, trainable, copied)
  shard = config.train.shard_params
  shardings = TrainState(
      step=sharding.replicated(mesh),
      params=sharding.tree_shardings(params, mesh, shard),
      batch_stats=sharding.tree_shardings(batch_stats, mesh, shard),
      opt_state=sharding.tree_shardings(jax.eval_shape(tx.init, trainable),
                                        mesh, shard))
  state = TrainState(
      step=jax.device_put(np.zeros((), np.int32), shardings.step),
      params=params, batch_stats=batch_stats,
      opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(
          trainable))
  setup = TrainSetup(graphdef=graphdef, eval_graphdef=eval_graphdef,
                     rest=rest, tx=tx, mesh=mesh, shardings=shardings,
                     trainable=trainable_filter)
  return setup, state


def create_optimizer(config: ml_collections.ConfigDict, trainable: nnx.State,
                     copied: Any = None) -> optax.GradientTransformation:
  """``optim.create_optimizer`` of the trainable parameters, new ones scaled.

  The update of each layer ``init_from`` did not copy is multiplied by
  ``train.new_layers_lr_mult`` (``finetune.scale_by_leaf``).

  Args:
    config: the run config (``train.new_layers_lr_mult``; it applies only
      with ``train.init_from``).
    trainable: the parameters that train.
    copied: the layers ``init_from`` copied (the others are new); None:
      unknown (a resumed run), every scale 1 until the checkpoint's are
      restored.
  """
  tx = optim.create_optimizer(config, trainable)
  mult = finetune.check_lr_mult(config.train.get('new_layers_lr_mult', 1.0))
  if mult == 1.0:
    return tx  # the optimiser state of runs without fine-tuning unchanged
  if not config.train.init_from:
    logging.warning('train.new_layers_lr_mult=%g has no effect without '
                    'train.init_from (no layer is copied).', mult)
    return tx
  scales = finetune.new_layer_scales(trainable, copied, mult)
  return optax.chain(tx, finetune.scale_by_leaf(scales))


def _loss(params: nnx.State, frozen: nnx.State, batch_stats: nnx.State,
          images: jax.Array, labels: jax.Array, key: jax.Array, *,
          graphdef: nnx.GraphDef, rest: nnx.State):
  """Mean cross-entropy, with the logits and updated BN statistics as aux.

  ``params`` are the trainable parameters (differentiated), ``frozen`` the
  others (constants: no gradient is computed through them).
  """
  model = nnx.merge(graphdef, params, frozen, batch_stats, rest, copy=True)
  logits = model(images, rngs=nnx.Rngs(dropout=key))
  loss = metrics.cross_entropy(logits, labels).mean()
  return loss, (logits, nnx.state(model, nnx.BatchStat))


def _given_crops(batch: Batch) -> jax.Array:
  return batch['image']


def train_step(state: TrainState, batch: Batch, learning_rate: jax.Array, *,
               graphdef: nnx.GraphDef, rest: nnx.State,
               tx: optax.GradientTransformation, normalize: Normalize,
               seed: int, trainable: Any = _ALL,
               images: Callable[[Batch], jax.Array] = _given_crops
               ) -> tuple[TrainState, TrainMetrics, jax.Array]:
  """One SGD step: forward, backward, update (see ``make_train_step``)."""
  key = jax.random.fold_in(jax.random.key(seed), state.step)
  loss_fn = functools.partial(_loss, graphdef=graphdef, rest=rest)
  # Differentiating only the trainable subset: no backward pass runs through
  # frozen layers that nothing trainable lies below (a frozen trunk).
  params, frozen = finetune.split_trainable(state.params, trainable)
  (loss, (logits, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(params, frozen, state.batch_stats,
                             normalize(images(batch)), batch['label'], key)
  updates, opt_state = tx.update(grads, state.opt_state, params)
  params = nnx.merge_state(
      optim.apply_updates(params, updates, learning_rate), frozen)
  new_state = TrainState(step=state.step + 1, params=params,
                         batch_stats=batch_stats, opt_state=opt_state)
  step_metrics = TrainMetrics.single_from_model_output(
      loss=loss, top1=metrics.topk_correct(logits, batch['label'], 1).mean(),
      top5=metrics.topk_correct(logits, batch['label'], 5).mean())
  return new_state, step_metrics, loss


def make_train_step(graphdef: nnx.GraphDef, rest: nnx.State,
                    tx: optax.GradientTransformation, normalize: Normalize,
                    seed: int, trainable: Any = _ALL,
                    images: Callable[[Batch], jax.Array] = _given_crops):
  """The pure training step: forward, backward, SGD update.

  Args:
    graphdef: the model's graph definition in training mode.
    rest: model state other than params and BN statistics (RNG streams).
    tx: the Optax chain from ``create_optimizer``.
    normalize: uint8 images -> normalised float32 on device.
    seed: base seed; dropout uses ``fold_in(seed, step)``, so it is the same
      for a resumed run and across device counts.
    trainable: the ``nnx`` filter of the parameters that train; the others
      are neither differentiated nor changed.
    images: batch -> its uint8 training crops: the batch's own images, or
      a `device_augment.Augmentation` of a host batch of source images.

  Returns:
    ``step(state, batch, learning_rate) -> (state, metrics, loss)``.
  """
  return functools.partial(train_step, graphdef=graphdef, rest=rest, tx=tx,
                           normalize=normalize, seed=seed, trainable=trainable,
                           images=images)


def eval_step(state: TrainState, batch: Batch, *, graphdef: nnx.GraphDef,
              rest: nnx.State, normalize: Normalize) -> dict[str, jax.Array]:
  """Sums of loss, top-1 and top-5 hits over the unmasked examples."""
  model = nnx.merge(graphdef, state.params, state.batch_stats, rest,
                    copy=True)
  logits = model(normalize(batch['image']),
                 valid_size=batch.get('valid_size'))
  mask = batch['mask'].astype(jnp.float32)
  return dict(
      loss=(metrics.cross_entropy(logits, batch['label']) * mask).sum(),
      top1=(metrics.topk_correct(logits, batch['label'], 1) * mask).sum(),
      top5=(metrics.topk_correct(logits, batch['label'], 5) * mask).sum(),
      count=mask.sum())


def make_eval_step(graphdef: nnx.GraphDef, rest: nnx.State,
                   normalize: Normalize):
  """``step(state, batch) -> sums`` of ``eval_step`` for an eval graphdef."""
  return functools.partial(eval_step, graphdef=graphdef, rest=rest,
                           normalize=normalize)


def _normalizer(config: ml_collections.ConfigDict) -> Normalize:
  return preprocessing.normalizer(config.input.normalization,
                                  config.input.mean_rgb)


def jit_train_step(setup: TrainSetup, config: ml_collections.ConfigDict):
  """``make_train_step`` compiled over the mesh, the state donated.

  Args:
    setup: from ``create_train_state``.
    config: the run config (input normalisation, seed).

  Returns:
    ``step(state, batch, learning_rate) -> (state, metrics, loss)`` taking
    global batch arrays split over the data axis.
  """
  batch_shd = sharding.batch_sharding(setup.mesh)
  images = _given_crops
  if config.input.augment_on_device:
    images = device_augment.Augmentation.from_config(config)
  return jax.jit(
      make_train_step(setup.graphdef, setup.rest, setup.tx,
                      _normalizer(config), config.seed, setup.trainable,
                      images),
      in_shardings=(setup.shardings, batch_shd, None),
      out_shardings=(setup.shardings, None, None), donate_argnums=(0,))


def train_batch_spec(config: ml_collections.ConfigDict,
                     source_shape: Sequence[int] | None = None
                     ) -> dict[str, jax.ShapeDtypeStruct]:
  """The global training batch's shapes.

  Args:
    config: the run config.
    source_shape: ``(H, W, 3)`` of the split's images, with
      ``input.augment_on_device`` (`input_pipeline.source_image_shape`).

  Returns:
    uint8 RGB crops and int32 labels, or `device_augment`'s host batch.
  """
  size, crop = config.train.batch_size, config.input.crop_size
  if config.input.augment_on_device:
    return device_augment.batch_spec(size, source_shape)
  return {'image': jax.ShapeDtypeStruct((size, crop, crop, 3), jnp.uint8),
          'label': jax.ShapeDtypeStruct((size,), jnp.int32)}


class BackgroundCompiled:
  """A jitted function compiled in a thread from abstract arguments.

  Called like the function (with arguments of those shapes); the first call
  waits for the compilation. Training starts compiling its step this way
  before it asks for the first batch, so compiling overlaps the input
  workers' start-up instead of following it (BENCHMARKS.md, start-up).
  """

  def __init__(self, jitted, *abstract_args):
    pool = concurrent.futures.ThreadPoolExecutor(
        1, thread_name_prefix='vgg_jax_compile')
    self._future = pool.submit(_compile, jitted, abstract_args)
    pool.shutdown(wait=False)
    self.waited = 0.0  # seconds calls spent waiting for the compilation

  def __call__(self, *args):
    if not self._future.done():
      t0 = time.monotonic()
      self._future.result()
      self.waited += time.monotonic() - t0
    return self._future.result()(*args)


def _compile(jitted, abstract_args):
  return jitted.lower(*abstract_args).compile()


def jit_eval_step(setup: TrainSetup, config: ml_collections.ConfigDict):
  """``make_eval_step`` in eval mode, compiled over the mesh.

  Args:
    setup: from ``create_train_state``.
    config: the run config (input normalisation).
  """
  return jax.jit(
      make_eval_step(setup.eval_graphdef, setup.rest, _normalizer(config)),
      in_shardings=(setup.shardings, sharding.batch_sharding(setup.mesh)))
