"""Grain input pipelines for training and evaluation.

Training (Simonyan & Zisserman 2015, Sec. 3.1), per example: decode; rescale
isotropically so the smallest side is S (fixed, or drawn uniformly from
``[scale_min, scale_max]`` per image); a random ``crop_size`` crop; a random
horizontal flip; AlexNet's PCA colour shift.
Evaluation (Sec. 3.2): rescale so the smallest side is Q, then either a central
crop (``'center_crop'``) or the whole image at the top-left of a fixed square
zero canvas (``'full'``, for dense and multi-crop evaluation, with
``valid_size``).

Batches hold uint8 images: they are normalised on the device with
`preprocessing.normalize`, which moves a quarter of the bytes of float32 and
keeps the host's work to decoding and resampling.

Training batch, ``B = global_batch_size / process_count``::

    {'image': uint8 (B, crop, crop, 3), 'label': int32 (B,),
     'skipped': int32 ()}   # records skipped since this stream's last batch

Evaluation batch::

    {'image': uint8 (B, crop, crop, 3) or (B, L, L, 3), 'label': int32 (B,),
     'mask': bool (B,),     # False: padding or an unreadable image
     'index': int32 (B,),   # example index in the split, -1 for padding
     'skipped': int32 (),   # unreadable images in this batch
     'valid_size': int32 (B, 2)}  # 'full' only: (h, w) on the canvas,
                                  # (0, 0) where mask is False

With ``config.input.augment_on_device`` a training batch holds the source
images instead (`in_memory`), and the train step cuts the crops
(`device_augment`)::

    {'image': uint8 (B, H, W, 3), 'label': int32 (B,),
     'record': int32 (B,), 'epoch': int32 (B,)}

Pop ``skipped`` before sending a batch to the devices. The epoch's order comes
from ``(config.seed, process, epoch)`` and every example's randomness from
``(config.seed, record index, epoch)``, so a run resumed from a checkpointed
iterator (``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore`` in an
Orbax ``Composite``) sees exactly the same examples. Unreadable records never
stop a run (`bad_records`): training skips them (counted in ``skipped`` and
logged with the record id), evaluation masks them out and logs each once per
process. Images larger than ``config.input.max_image_pixels`` are unreadable
records. Worker processes (``config.data.num_workers``) end with the process
that started them, however it ends (`workers`).

A class subset (``config.data.classes``, `datasets.subsets`) restricts every
split to the records of those classes, listed once per split from labels
alone; sharding, shuffling and padding then work on that list as on a whole
split, with the same guarantees, and labels are remapped to ``0..k-1``.
``index`` stays the record's index in the whole split.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import grain
import jax
import ml_collections
import numpy as np
from PIL import Image

from vgg_jax import bad_records
from vgg_jax import datasets
from vgg_jax import decoding
from vgg_jax import in_memory
from vgg_jax import preprocessing
from vgg_jax import splits
from vgg_jax import workers
from vgg_jax.datasets import DatasetInfo
from vgg_jax.datasets import subsets

EVAL_MODES = ('center_crop', 'full')

__all__ = [
    'DatasetInfo', 'EVAL_MODES', 'get_dataset_info', 'create_train_iterator',
    'create_eval_iterator', 'num_eval_batches',
]


def _builder(config: ml_collections.ConfigDict):
  return datasets.get_builder(config.data.dataset,
                              data_dir=config.data.data_dir,
                              manual_dir=config.data.manual_dir)


def _prepared_builder(config: ml_collections.ConfigDict):
  builder = _builder(config)
  datasets.ensure_prepared(builder, config.data.manual_dir)
  info = subsets.subset_info(builder, datasets.dataset_info(builder),
                             config.data.get('classes', ()))
  return builder, info


def get_dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
  """Describes the configured dataset, preparing it first if needed.

  Args:
    config: the experiment config (``config.data`` selects the dataset and
      ``config.data.classes`` a class subset).

  Returns:
    Name, class count and names, and examples per split (of the subset).
  """
  return _prepared_builder(config)[1]


def _split(config: ml_collections.ConfigDict, split: str) -> splits.Split:
  builder, info = _prepared_builder(config)
  source = datasets.data_source(builder, split, info)
  return splits.Split(split, info, source, subsets.subset_records(source, info),
                subsets.label_map(info))


def _process(process_index: int | None, process_count: int | None
             ) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f'process_index {index} not in [0, {count}).')
  return index, count


def _local_batch(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'Global batch size {global_batch_size} must be a '
                     f'positive multiple of the process count {process_count}.')
  return global_batch_size // process_count


def _check_input_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming the first inconsistent input setting."""
  cfg = config.input
  if cfg.crop_size <= 0:
    raise ValueError(f'input.crop_size must be > 0, got {cfg.crop_size}.')
  preprocessing.check_scale(cfg.scale_min, cfg.crop_size, 'input.scale_min')
  if cfg.scale_min > cfg.scale_max:
    raise ValueError(f'input.scale_min {cfg.scale_min} exceeds '
                     f'input.scale_max {cfg.scale_max}.')
  if cfg.pca_sigma < 0:
    raise ValueError(f'input.pca_sigma must be >= 0, got {cfg.pca_sigma}.')
  if cfg.interpolation not in preprocessing.INTERPOLATIONS:
    raise ValueError(f'Unknown input.interpolation {cfg.interpolation!r}; '
                     f'valid: {", ".join(preprocessing.INTERPOLATIONS)}.')
  if cfg.normalization not in preprocessing.NORMALIZATIONS:
    raise ValueError(f'Unknown input.normalization {cfg.normalization!r}; '
                     f'valid: {", ".join(preprocessing.NORMALIZATIONS)}.')
  if config.data.cache_decoded_mb < 0:
    raise ValueError('data.cache_decoded_mb must be >= 0, got '
                     f'{config.data.cache_decoded_mb}.')


def _read_options(threads: int, buffer_size: int) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=threads,
                           prefetch_buffer_size=buffer_size)


def _multiprocess(ds: grain.IterDataset, config: ml_collections.ConfigDict,
                  num_workers: int | None = None) -> grain.IterDataset:
  if num_workers is None or num_workers == -1:
    num_workers = config.data.num_workers
  elif num_workers < 0:
    raise ValueError('data.eval_num_workers must be >= -1 (-1: as '
                     f'data.num_workers), got {num_workers}.')
  return workers.prefetch(ds, num_workers=num_workers,
                          buffer_size=config.data.prefetch_buffer_size)


class DecodedCache:
  """Decoded training images of one process, up to a byte budget.

  For datasets that fit in memory (``config.data.cache_decoded_mb``):
  reading, parsing and decoding a record cost the quickstart's 28x28
  Fashion-MNIST images about twice the rescale, crop and flip (BENCHMARKS.md),
  so each worker keeps what it decoded and later epochs skip that work.
  Records move between workers from epoch to epoch, so each worker ends up
  holding most of the split: budget per worker. The augmentation itself is
  unchanged (it runs on the decoded image, as before).
  """

  def __init__(self, budget_bytes: int):
    self._budget = budget_bytes
    self._used = 0
    self._images: dict[int, tuple[Image.Image, np.int32]] = {}

  def __bool__(self) -> bool:
    return self._budget > 0

  def get(self, key: int) -> tuple[Image.Image, np.int32] | None:
    return self._images.get(key)

  def put(self, key: int, image: Image.Image, label: np.int32) -> None:
    size = image.width * image.height * len(image.getbands())
    if self._used + size <= self._budget:
      self._images[key] = (image, label)
      self._used += size


class _TrainExample:
  """Reads and augments the example at position ``index`` of the stream.

  Called by ``map_with_index`` over an endless range: position ``index`` is
  record ``keys[order[index % n]]`` of epoch ``index // n``, where ``keys``
  are this process's (``shard``'s) ``n`` records and ``order`` a fresh
  permutation per epoch and process. The example's randomness comes from
  ``(seed, record, epoch)``.
  """

  def __init__(self, data: splits.Split, keys: Sequence[int], shard: int,
               config: ml_collections.ConfigDict):
    self._data = data
    self._keys = keys
    self._shard = shard
    self._seed = config.seed
    cfg = config.input
    self._scale_min, self._scale_max = cfg.scale_min, cfg.scale_max
    self._crop_size = cfg.crop_size
    self._flip = cfg.random_flip
    self._pca_sigma = cfg.pca_sigma
    self._interpolation = cfg.interpolation
    self._draft = cfg.jpeg_draft
    self._max_pixels = cfg.max_image_pixels
    self._cache = DecodedCache(int(config.data.cache_decoded_mb * 2 ** 20))

  def __call__(self, index: int, _
               ) -> dict[str, Any] | bad_records.SkippedRecord:
    epoch, position = divmod(index, len(self._keys))
    order = splits.epoch_order(self._seed, self._shard, epoch, len(self._keys))
    key = int(self._keys[int(order[position])])
    rng = np.random.default_rng((self._seed, key, epoch))
    scale = int(rng.integers(self._scale_min, self._scale_max + 1))
    cached = self._cache.get(key)
    if cached is not None:
      image, label = cached
      return {'image': self._augment(image, scale, rng), 'label': label}
    data = self._data
    record = data.source[key]
    label = data.label(record)
    try:
      # A cached image is decoded whole: JPEG draft decoding depends on S.
      image = decoding.decode(
          record[data.info.image_key], max_pixels=self._max_pixels,
          min_side=scale if self._draft and not self._cache else None)
    except decoding.ImageDecodeError as e:
      return bad_records.SkippedRecord(
          bad_records.record_id(data.info, data.name, key, record), str(e))
    self._cache.put(key, image, label)
    return {'image': self._augment(image, scale, rng), 'label': label}

  def _augment(self, image: Image.Image, scale: int,
               rng: np.random.Generator) -> np.ndarray:
    image = preprocessing.random_crop(
        image, scale=scale, crop_size=self._crop_size, rng=rng,
        interpolation=self._interpolation)
    if self._flip:
      image = preprocessing.random_flip(image, rng)
    if self._pca_sigma > 0:
      image = preprocessing.apply_color_shift(
          image, preprocessing.pca_color_shift(rng, self._pca_sigma))
    return np.asarray(image)


def create_train_iterator(config: ml_collections.ConfigDict, *,
                          global_batch_size: int | None = None,
                          process_index: int | None = None,
                          process_count: int | None = None,
                          split: str | None = None) -> grain.DatasetIterator:
  """An endless, checkpointable iterator of this process's training batches.

  The split (or its class subset's records) is sharded over processes
  (process ``i`` reads records ``i, i + n, i + 2n, ...`` of it), each shard
  is reshuffled every epoch with ``config.seed``, and
  ``config.data.num_workers`` processes decode it.

  Args:
    config: the experiment config.
    global_batch_size: batch over all processes (default
      ``config.train.batch_size``).
    process_index: this process (default ``jax.process_index()``).
    process_count: number of processes (default ``jax.process_count()``).
    split: split to read (default ``config.data.train_split``).

  Returns:
    A Grain iterator of batch dicts (module docstring); save and restore it
    with ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore``.
  """
  _check_input_config(config)
  index, count = _process(process_index, process_count)
  batch = _local_batch(global_batch_size or config.train.batch_size, count)
  data = _split(config, split or config.data.train_split)
  keys = data.records[index::count]
  if not len(keys):  # pylint: disable=g-explicit-length-test
    raise ValueError(f'Split {data.name!r} has {len(data.records)} examples, '
                     f'too few for {count} processes.')
  if config.input.augment_on_device:
    return in_memory.train_iterator(data, keys, index, batch, config)
  # The transform maps stream positions to records (see _TrainExample).
  ds = grain.MapDataset.range(len(keys)).repeat()
  ds = ds.map_with_index(_TrainExample(data, keys, index, config))
  ds = ds.to_iter_dataset(_read_options(config.data.read_threads,
                                        config.data.read_buffer_size))
  ds = bad_records.SkipCountingIterDataset(
      ds, config.data.max_consecutive_skips)
  ds = ds.batch(batch, drop_remainder=True)
  ds = _multiprocess(ds, config)
  return workers.close_at_exit(ds.map(bad_records.sum_skipped).__iter__())


def source_image_shape(config: ml_collections.ConfigDict,
                       split: str | None = None) -> tuple[int, ...]:
  """``(H, W, 3)`` of the split's first image: with
  ``input.augment_on_device``, that of every image the host batches hold.

  Args:
    config: the experiment config.
    split: the split (default ``config.data.train_split``).
  """
  data = _split(config, split or config.data.train_split)
  encoded, _ = data.encoded_and_label(int(data.records[0]))
  image = decoding.decode(encoded, max_pixels=config.input.max_image_pixels)
  return np.asarray(image).shape


class _EvalExample:
  """Reads example ``index`` of the split's records (padding beyond them)."""

  def __init__(self, data: splits.Split, *, scale: int, mode: str,
               config: ml_collections.ConfigDict):
    self._data = data
    self._scale = scale
    self._mode = mode
    self._crop_size = config.input.crop_size
    self._canvas = preprocessing.canvas_size(scale,
                                             config.input.dense_max_aspect)
    self._interpolation = config.input.interpolation
    self._max_pixels = config.input.max_image_pixels

  @property
  def image_side(self) -> int:
    return self._canvas if self._mode == 'full' else self._crop_size

  def __call__(self, index: int) -> dict[str, Any]:
    index = int(index)
    side = self.image_side
    example = {'image': np.zeros((side, side, 3), np.uint8),
               'label': np.int32(0), 'mask': np.bool_(False),
               'index': np.int32(-1),
               'skipped': np.int32(0),
               'unreadable': '', 'unreadable_reason': ''}
    if self._mode == 'full':
      example['valid_size'] = np.zeros(2, np.int32)
    data = self._data
    if index >= len(data.records):
      return example
    key = int(data.records[index])
    record = data.source[key]
    example['label'] = data.label(record)
    example['index'] = np.int32(key)
    try:
      image = decoding.decode(record[data.info.image_key],
                                   max_pixels=self._max_pixels)
      if self._mode == 'full':
        pixels, size = preprocessing.rescale_to_canvas(
            image, scale=self._scale, canvas=self._canvas,
            interpolation=self._interpolation)
        example['valid_size'] = np.asarray(size, np.int32)
      else:
        pixels = np.asarray(preprocessing.center_crop(
            image, scale=self._scale, crop_size=self._crop_size,
            interpolation=self._interpolation))
    except decoding.ImageDecodeError as e:
      # Reported by the consuming process (bad_records.report_unreadable):
      # an unreadable record is named once, not once per stream.
      record_id = bad_records.record_id(data.info, data.name, key, record)
      example['unreadable'] = f'{data.info.name} {record_id}'
      example['unreadable_reason'] = str(e)
      example['skipped'] = np.int32(1)
      return example
    example['image'] = pixels
    example['mask'] = np.bool_(True)
    return example


def num_eval_batches(config: ml_collections.ConfigDict, *,
                     split: str | None = None,
                     global_batch_size: int | None = None,
                     process_count: int | None = None) -> int:
  """Batches every process yields for one pass over the evaluation split.

  Args:
    config: the experiment config.
    split: split (default ``config.data.eval_split``).
    global_batch_size: default ``config.train.eval_batch_size``.
    process_count: default ``jax.process_count()``.

  Returns:
    ``ceil(num_examples / global_batch_size)``, the same on every process.
  """
  _, count = _process(0, process_count)
  global_batch = global_batch_size or config.train.eval_batch_size
  _local_batch(global_batch, count)
  data = _split(config, split or config.data.eval_split)
  return max(1, math.ceil(len(data.records) / global_batch))


def create_eval_iterator(config: ml_collections.ConfigDict, *,
                         scale: int, mode: str, split: str | None = None,
                         global_batch_size: int | None = None,
                         process_index: int | None = None,
                         process_count: int | None = None
                         ) -> grain.DatasetIterator:
  """One pass over the evaluation split at test scale Q, in fixed-size batches.

  Example ``g`` of the padded split goes to process ``g % process_count``;
  the padding up to ``num_eval_batches * global_batch_size`` has mask False,
  so every example counts exactly once and every process yields
  `num_eval_batches` batches (evaluation steps are collective).

  Args:
    config: the experiment config.
    scale: Q, the smallest side after rescaling.
    mode: 'center_crop' (``crop_size`` crop) or 'full' (the whole image on a
      square canvas of side `preprocessing.canvas_size(Q,
      config.input.dense_max_aspect)`).
    split: split (default ``config.data.eval_split``).
    global_batch_size: default ``config.train.eval_batch_size``.
    process_index: default ``jax.process_index()``.
    process_count: default ``jax.process_count()``.

  Returns:
    A finite Grain iterator of batch dicts (module docstring).
  """
  if mode not in EVAL_MODES:
    raise ValueError(f'Unknown eval mode {mode!r}; valid: '
                     f'{", ".join(EVAL_MODES)}.')
  if mode == 'center_crop':
    preprocessing.check_scale(scale, config.input.crop_size, 'Test scale')
  index, count = _process(process_index, process_count)
  global_batch = global_batch_size or config.train.eval_batch_size
  batch = _local_batch(global_batch, count)
  data = _split(config, split or config.data.eval_split)
  num_batches = max(1, math.ceil(len(data.records) / global_batch))
  padded = grain.MapDataset.range(num_batches * global_batch)[index::count]
  ds = padded.map(_EvalExample(data, scale=scale, mode=mode, config=config))
  # Batching before the workers split the data keeps every batch full and
  # their number fixed; each thread then decodes a whole batch.
  threads = config.data.eval_read_threads
  ds = ds.batch(batch).to_iter_dataset(_read_options(threads, threads))
  ds = _multiprocess(ds, config, config.data.get('eval_num_workers'))
  return workers.close_at_exit(
      ds.map(bad_records.report_unreadable).__iter__())

