r"""The paper's feature protocol (Appendix B): pooled, L2-normalised features.

Command line::

    python -m vgg_jax.extract --workdir=DIR --split=train \
        --output=feats_train.npz [--layer=relu7] [--scales=256,384,512] \
        [--config.data.dataset=image_folder --config.data.manual_dir=/data]

``DIR`` is a training workdir or a pretrained dir; ``--config.data.*`` reads
another dataset than the net's own (the weights' normalisation is kept). Per
image and scale Q, the whole image at smallest side Q goes on the evaluation
canvas (``input_pipeline`` ``'full'`` mode) and the layer is computed densely
(``VGG.features`` with ``valid_size``), then averaged over the positions
inside the image (head layers: where FC-6's window lies inside it; trunk
layers: the image's region at the layer's stride); likewise the mirror
image. The two are averaged, then the scales, and the result L2-normalised
(the paper trains a linear SVM on it; see ``vgg_jax.linear_probe``).

The default layer is ``relu7``, FC-7 after its ReLU: the paper's 4,096-d
descriptor (``fc7`` is FC-7 *before* the ReLU). Any name of
``models.layer_names(net)`` works (``pool5``, ``relu5_3``, ...).

The output is an uncompressed ``.npz`` (``np.load``, or
``linear_probe.load_features``): ``features`` float32 (N, D), ``labels``
int32 (N,), ``index`` int32 (N,) (example index in the split, ascending;
unreadable images are left out), ``class_names`` str (C,) (the dataset's),
``layer`` str and ``scales`` int32 (S,). Memory is bounded by a batch: rows
go to a memory-mapped ``.npy`` beside the output as they are computed and
are copied into the ``.npz`` in chunks at the end. One process (its local
devices split each batch).
"""

from __future__ import annotations

from vgg_jax import host_memory

if __name__ == '__main__':  # first: glibc reads its tunables at start-up
  host_memory.reexec_with_huge_pages()

# pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import functools
import os
import tempfile
from typing import Any, Callable, Iterator, Mapping, Sequence

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from vgg_jax import cli
from vgg_jax import eval_plan
from vgg_jax import input_pipeline
from vgg_jax import layers as layers_lib
from vgg_jax import models
from vgg_jax import paths
from vgg_jax import preprocessing
from vgg_jax import protocols
from vgg_jax import sharding as sharding_lib

DEFAULT_LAYER = 'relu7'  # FC-7 after its ReLU: the classic VGG descriptor
_EPS = 1e-12  # norm floor: an all-zero descriptor stays zero
_LOG_EVERY_BATCHES = 50


def pooled_features(model: models.VGG, images: jax.Array,
                    valid_size: jax.Array, layer: str) -> jax.Array:
  """A layer's map averaged over the positions inside each image.

  Args:
    model: a VGG in eval mode.
    images: normalised ``(N, H, W, C)`` canvases, each image top-left.
    valid_size: ``(N, 2)`` int image sizes.
    layer: the layer's name.

  Returns:
    ``(N, channels)`` float32; zero for an image with no valid position.
  """
  act = model.features(images, [layer], valid_size=valid_size)[layer]
  mask = model.layer_mask(layer, valid_size, act.shape[1:3])
  # features() has already zeroed the map outside the mask.
  total = act.astype(jnp.float32).sum(axis=(1, 2))
  count = mask.sum(axis=(1, 2)).astype(jnp.float32)
  return total / jnp.maximum(count, 1.0)[:, None]


def l2_normalize(features: np.ndarray) -> np.ndarray:
  """Rows scaled to unit L2 norm (all-zero rows stay zero), float32."""
  features = np.asarray(features, np.float32)
  norms = np.linalg.norm(features, axis=-1, keepdims=True)
  return features / np.maximum(norms, _EPS)


@dataclasses.dataclass(eq=False)
class FeatureFn:
  """``(weights, uint8 images, valid_size) -> (N, D)`` mirrored features.

  A pure function of the weights, to be jitted (as ``protocols.SourceFn``).

  Attributes:
    graphdef: the network's graph, in eval mode.
    rng_state: its RNG state (eval mode draws none).
    normalize: ``uint8 images -> float32`` as the weights expect.
    layer: the layer's name.
  """
  graphdef: Any
  rng_state: Any
  normalize: Callable[[jax.Array], jax.Array]
  layer: str

  def __call__(self, weights: Any, images: jax.Array, valid_size: jax.Array
               ) -> jax.Array:
    net = nnx.merge(self.graphdef, self.rng_state, weights)
    images = self.normalize(images)
    flipped = protocols.flip_valid(images, valid_size)
    return 0.5 * (pooled_features(net, images, valid_size, self.layer) +
                  pooled_features(net, flipped, valid_size, self.layer))


@dataclasses.dataclass
class FeatureFile:
  """What ``extract_features`` wrote: ``num_examples`` rows of ``dim``."""
  path: str
  num_examples: int
  dim: int
  num_batches: int
  layer: str
  scales: tuple[int, ...]


def _check_request(model: models.VGG, config: ml_collections.ConfigDict,
                   layer: str, scales: Sequence[int] | None
                   ) -> tuple[int, ...]:
  """Checks the layer and scales; returns the scales (default: the run's)."""
  layers_lib.check_layers(model.name, [layer])
  scales = tuple(scales) if scales else protocols.default_scales(config)
  if layer in layers_lib.HEAD_ACTIVATIONS:
    # The image must hold FC-6's window, or no position would count.
    preprocessing.check_scale(scales, 32 * model.fc6.kernel_size[0],
                              'Test scale')
  elif any(q <= 0 for q in scales):
    raise ValueError(f'Test scales must be positive, got {scales}.')
  if jax.process_count() > 1:
    raise ValueError('extract runs in one process; run it once per host on '
                     'a part of the data instead.')
  return scales


def _batches(config: ml_collections.ConfigDict, split: str,
             scales: Sequence[int], batch_size: int
             ) -> Iterator[tuple[Mapping[str, np.ndarray], ...]]:
  """The split's batches, one per scale, in lockstep (same examples)."""
  streams = [input_pipeline.create_eval_iterator(
      config, scale=q, mode='full', split=split,
      global_batch_size=batch_size, process_index=0, process_count=1)
             for q in scales]
  # Every stream pads and orders the split alike: batch i is the same
  # examples at every scale.
  yield from zip(*streams)


class _RowWriter:
  """Appends rows to a memory-mapped ``.npy`` created at the first batch."""

  def __init__(self, directory: str, capacity: int):
    self._path = os.path.join(directory, 'features.npy')
    self._capacity = capacity
    self.rows = None
    self.count = 0
    self.labels, self.index = [], []

  def append(self, features: np.ndarray, labels: np.ndarray,
             index: np.ndarray) -> None:
    if self.rows is None:
      self.rows = np.lib.format.open_memmap(
          self._path, mode='w+', dtype=np.float32,
          shape=(self._capacity, features.shape[1]))
    if self.index and len(index) and index[0] <= self.index[-1][-1]:
      raise RuntimeError('Examples out of order.')  # the pipeline's contract
    self.rows[self.count:self.count + len(features)] = features
    self.count += len(features)
    self.labels.append(labels.astype(np.int32))
    self.index.append(index.astype(np.int32))

  def save(self, output: str, class_names: Sequence[str], layer: str,
           scales: Sequence[int], overwrite: bool) -> None:
    """Writes the ``.npz`` (replacing ``output`` whole, or not at all)."""
    with paths.replaced_atomically(output, overwrite=overwrite) as tmp:
      with open(os.fspath(tmp), 'wb') as f:
        # np.savez copies a memmap in 16 MB chunks: memory stays bounded.
        np.savez(f, features=self.rows[:self.count],
                 labels=np.concatenate(self.labels),
                 index=np.concatenate(self.index),
                 class_names=np.asarray(list(class_names), dtype=str),
                 layer=np.asarray(layer), scales=np.asarray(scales, np.int32))


def _device_fn(model: models.VGG, config: ml_collections.ConfigDict,
               layer: str, normalization: str | None,
               mean_rgb: Sequence[float] | None, mesh):
  """The jitted ``FeatureFn`` and the model's weights placed on ``mesh``."""
  member = eval_plan.Member(model, config, normalization=normalization,
                            mean_rgb=mean_rgb)
  graphdef, rng_state, weights = member.eval_split()
  weights = jax.device_put(weights, sharding_lib.replicated(mesh))
  fn = jax.jit(FeatureFn(graphdef, rng_state, member.normalizer(), layer))
  return fn, weights


def _stream(fn, weights, batches, mesh, writer: _RowWriter,
            normalize: bool) -> int:
  """Runs every batch (all scales) and appends the kept rows; batch count."""
  num_batches = 0
  for per_scale in batches:
    total = 0.0
    for batch in per_scale:
      inputs = sharding_lib.global_batch(
          {'image': batch['image'], 'valid_size': batch['valid_size']}, mesh)
      total = total + np.asarray(fn(weights, inputs['image'],
                                    inputs['valid_size']))
    keep = np.asarray(per_scale[0]['mask'], bool)
    features = total / len(per_scale)
    if normalize:
      features = l2_normalize(features)
    writer.append(np.asarray(features, np.float32)[keep],
                  per_scale[0]['label'][keep], per_scale[0]['index'][keep])
    num_batches += 1
    if num_batches % _LOG_EVERY_BATCHES == 0:
      logging.info('extract: %d batches, %d images', num_batches,
                   writer.count)
  return num_batches


def extract_features(model: models.VGG, config: ml_collections.ConfigDict,
                     output: str, *, layer: str = DEFAULT_LAYER,
                     scales: Sequence[int] | None = None,
                     split: str | None = None,
                     batch_size: int | None = None,
                     normalization: str | None = None,
                     mean_rgb: Sequence[float] | None = None,
                     normalize: bool = True,
                     overwrite: bool = False) -> FeatureFile:
  """Writes the pooled features of every image of a split (module docstring).

  Args:
    model: the net (its mode is left unchanged; an eval-mode view is used).
    config: the config whose ``data`` and ``input`` sections say what to
      read and how (``input.dense_max_aspect``, ``input.interpolation``).
    output: the ``.npz`` file to write (a local path).
    layer: a name of ``models.layer_names(model.name)``; default ``relu7``.
    scales: test scales Q, averaged; None: ``protocols.default_scales``.
    split: the split; None: ``config.data.eval_split``.
    batch_size: images per batch (a multiple of the device count); None:
      ``config.train.eval_batch_size``.
    normalization: the input normalisation the weights expect; None: the
      config's (``weights.load_model``'s metadata has the weights' own).
    mean_rgb: its mean, likewise.
    normalize: L2-normalise each descriptor (the protocol); False keeps the
      average over positions, mirror and scales as it is.
    overwrite: replace an existing ``output``.

  Returns:
    What was written.

  Raises:
    ValueError: an unknown layer (the message lists the valid ones), a test
      scale too small for a head layer, or a bad batch size.
    FileExistsError: ``output`` exists and ``overwrite`` is False.
  """
  scales = _check_request(model, config, layer, scales)
  split = split or config.data.eval_split
  batch_size = int(config.train.eval_batch_size if batch_size is None
                   else batch_size)
  mesh = sharding_lib.create_mesh()
  if batch_size <= 0 or batch_size % jax.device_count():
    raise ValueError(f'Batch size {batch_size} must be a positive multiple '
                     f'of the device count {jax.device_count()}.')
  if paths.absolute(output).exists() and not overwrite:
    raise FileExistsError(f'{output} exists; pass overwrite=True (CLI: '
                          '--overwrite) to replace it.')
  info = input_pipeline.get_dataset_info(config)
  fn, weights = _device_fn(model, config, layer, normalization, mean_rgb,
                           mesh)
  parent = os.path.dirname(os.path.abspath(output))
  os.makedirs(parent, exist_ok=True)
  # The row file sits beside the output: same disk, removed in any case.
  with tempfile.TemporaryDirectory(dir=parent, prefix='.extract-') as tmp:
    # Padded batches bound the row count without reading the split first.
    capacity = batch_size * input_pipeline.num_eval_batches(
        config, split=split, global_batch_size=batch_size, process_count=1)
    writer = _RowWriter(tmp, capacity)
    num_batches = _stream(fn, weights,
                          _batches(config, split, scales, batch_size), mesh,
                          writer, normalize)
    if writer.count == 0:
      raise ValueError(f'No readable image in split {split!r}.')
    writer.save(output, info.class_names, layer, scales, overwrite)
    result = FeatureFile(path=output, num_examples=writer.count,
                         dim=writer.rows.shape[1], num_batches=num_batches,
                         layer=layer, scales=scales)
    del writer  # closes the memmap before its directory is removed
  logging.info('extract: %d images of %r, %s at Q=%s, D=%d -> %s',
               result.num_examples, split, layer, scales, result.dim, output)
  return result


def define_flags(flag_values: flags.FlagValues) -> None:
  """The flags of ``python -m vgg_jax.extract``.

  Args:
    flag_values: where to register them.
  """
  flags.DEFINE_string('workdir', None, 'Training workdir or pretrained dir.',
                      required=True, flag_values=flag_values)
  flags.DEFINE_string('output', None, 'The .npz file to write.',
                      required=True, flag_values=flag_values)
  flags.DEFINE_string('checkpoint', 'latest', 'latest, best or a step number.',
                      flag_values=flag_values)
  flags.DEFINE_string('split', None, 'Dataset split; default: the run\'s '
                      'config.data.eval_split.', flag_values=flag_values)
  flags.DEFINE_string('layer', DEFAULT_LAYER, 'Layer to pool: relu7 (FC-7 '
                      'after ReLU, the paper\'s; fc7 is before it), pool5, '
                      'relu5_3, ...', flag_values=flag_values)
  flags.DEFINE_string(
      'scales', None, 'Test scale(s) Q, e.g. 256,384,512 (features averaged); '
      'default: the run\'s single-scale default.', flag_values=flag_values)
  flags.DEFINE_integer('batch_size', None, 'Images per batch; default: '
                       'config.train.eval_batch_size.', flag_values=flag_values)
  flags.DEFINE_bool('overwrite', False, 'Replace an existing --output.',
                    flag_values=flag_values)
  cli.define_config_overrides(flag_values)


def main(flag_values: flags.FlagValues) -> int:
  """``python -m vgg_jax.extract``; the exit code.

  Args:
    flag_values: parsed ``define_flags`` flags.
  """
  member = eval_plan.load_member(
      flag_values.workdir, checkpoint=flag_values.checkpoint,
      config_overrides=functools.partial(cli.apply_config_overrides,
                                         flag_values=flag_values))
  normalization, mean_rgb = member.normalization_spec()
  result = extract_features(
      member.model, member.config, flag_values.output,
      layer=flag_values.layer,
      scales=protocols.parse_scales(flag_values.scales),
      split=flag_values.split, batch_size=flag_values.batch_size,
      normalization=normalization, mean_rgb=mean_rgb,
      overwrite=flag_values.overwrite)
  print(f'{result.path}: {result.num_examples} x {result.dim} {result.layer} '
        f'features at Q={",".join(map(str, result.scales))}')
  return 0


if __name__ == '__main__':
  cli.run(define_flags, main)
