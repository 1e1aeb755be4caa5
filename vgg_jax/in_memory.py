"""Training batches of a split held in memory, for `device_augment`.

With ``config.input.augment_on_device`` the host keeps the decoded training
shard in one uint8 array (decoded ahead in a thread, bounded by
``config.data.cache_decoded_mb``) and a batch is a gather: source images,
labels, and each image's record and epoch, from which the train step draws
and cuts the crops (`device_augment`). Records are read in the host
pipeline's order (`splits.epoch_order`), and the iterator checkpoints like
the host pipeline's.
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

import grain
import ml_collections
import numpy as np

from vgg_jax import decoding
from vgg_jax import device_augment
from vgg_jax import splits


class InMemoryShard:
  """A shard's decoded images and labels, decoded ahead or on first use.

  Args:
    read: key -> ``(encoded image, label)`` of a record.
    keys: the shard's record keys; positions below index them.
    budget_mb: the most memory the decoded shard may take.
    max_pixels: larger images are errors, as on the host path.
  """

  def __init__(self, read: Callable[[int], tuple[bytes, np.int32]],
               keys: Sequence[int], budget_mb: float, max_pixels: int):
    self._read, self._keys, self._max_pixels = read, keys, max_pixels
    first = self._decode(0)
    need = len(keys) * first[0].nbytes
    if need > budget_mb * 2 ** 20:
      raise ValueError(
          f'input.augment_on_device keeps the decoded training shard in '
          f'memory: {len(keys)} images of {first[0].shape} take '
          f'{need / 2 ** 20:.0f} MiB, more than data.cache_decoded_mb='
          f'{budget_mb:g}.')
    self.image_shape = first[0].shape
    self._images = np.zeros((len(keys), *self.image_shape), np.uint8)
    self._labels = np.zeros(len(keys), np.int32)
    self._ready = np.zeros(len(keys), bool)
    self._store(0, *first)

  def _decode(self, position: int) -> tuple[np.ndarray, np.int32]:
    key = int(self._keys[position])
    encoded, label = self._read(key)
    try:
      image = decoding.decode(encoded, max_pixels=self._max_pixels)
    except decoding.ImageDecodeError as e:
      raise decoding.ImageDecodeError(
          f'training record {key}: {e} (input.augment_on_device needs every '
          'image of the split; the host path, without it, skips bad '
          'records)') from e
    return np.asarray(image), label

  def _store(self, position: int, image: np.ndarray, label: np.int32) -> None:
    if image.shape != self.image_shape:
      raise ValueError(
          f'input.augment_on_device needs images of one size: training '
          f'record {int(self._keys[position])} is {image.shape}, the first '
          f'{self.image_shape}.')
    self._images[position] = image
    self._labels[position] = label
    self._ready[position] = True

  def decode_ahead(self, order: np.ndarray) -> None:
    """Decodes the shard in ``order`` in a daemon thread, from now on.

    Started with the first batch, it overlaps most of the first epoch's
    decoding with the compilation of the train step. A record it cannot
    store stops it: ``gather`` then meets the record and raises.
    """
    threading.Thread(target=self._decode_all, args=(order,), daemon=True,
                     name='vgg_jax_decode_ahead').start()

  def _decode_all(self, order: np.ndarray) -> None:
    try:
      self._fill(order)
    except Exception:  # pylint: disable=broad-except
      pass  # reported by gather, in the training loop

  def _fill(self, positions: np.ndarray) -> None:
    """Decodes and stores those of ``positions`` not decoded yet."""
    for position in positions:
      if not self._ready[position]:
        self._store(int(position), *self._decode(int(position)))

  def gather(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The images ``(N, H, W, 3)`` and labels ``(N,)`` at these positions."""
    self._fill(positions)
    return self._images[positions], self._labels[positions]


class HostBatches:
  """Grain transform: batch number ``index`` -> host batch (no resampling).

  Batch ``index`` holds stream positions ``index * B ... index * B + B - 1``,
  mapped to records as in `input_pipeline` (the same epoch order).
  """

  def __init__(self, data: splits.Split, keys: Sequence[int], shard: int,
               batch_size: int, config: ml_collections.ConfigDict):
    self._keys = np.asarray(keys, np.int32)
    self._shard_images = InMemoryShard(
        data.encoded_and_label, keys,
        config.data.cache_decoded_mb, config.input.max_image_pixels)
    self._shard, self._batch, self._seed = shard, batch_size, config.seed
    self._decoding_ahead = False

  def __call__(self, index: int, _) -> dict[str, np.ndarray]:
    epochs, positions = np.divmod(
        np.arange(index * self._batch, (index + 1) * self._batch),
        len(self._keys))
    if not self._decoding_ahead:
      # From the first batch asked for, in its epoch's order: training then
      # waits for the step's compilation (no Python to compete with for the
      # GIL), where earlier the decoding slowed the model's creation.
      self._decoding_ahead = True
      self._shard_images.decode_ahead(splits.epoch_order(
          self._seed, self._shard, int(epochs[0]), len(self._keys)))
    for epoch in np.unique(epochs):
      order = splits.epoch_order(self._seed, self._shard, int(epoch),
                                 len(self._keys))
      positions[epochs == epoch] = order[positions[epochs == epoch]]
    images, labels = self._shard_images.gather(positions)
    return {'image': images, 'label': labels,
            'record': self._keys[positions],
            'epoch': epochs.astype(np.int32)}


def train_iterator(data: splits.Split, keys: Sequence[int], shard: int,
                   batch_size: int, config: ml_collections.ConfigDict
                   ) -> grain.DatasetIterator:
  """An endless, checkpointable iterator of host batches of one shard.

  Args:
    data: the split.
    keys: the shard's records.
    shard: the shard (process) index.
    batch_size: images per batch of this process.
    config: the experiment config.
  """
  if config.input.interpolation != device_augment.INTERPOLATION:
    raise ValueError(
        'input.augment_on_device resamples bilinearly only; got '
        f'input.interpolation={config.input.interpolation!r}.')
  # Batches are cheap gathers: built in this process, ahead by a thread.
  ds = grain.MapDataset.range(2 ** 62).map_with_index(
      HostBatches(data, keys, shard, batch_size, config))
  return ds.to_iter_dataset(grain.ReadOptions(
      num_threads=1,
      prefetch_buffer_size=config.data.prefetch_buffer_size)).__iter__()
