"""The records a training or evaluation pipeline reads, and their order.

Shared by the host pipeline (`input_pipeline`) and the in-memory one
(`in_memory`), so both read a shard's records in the same order.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import numpy as np

from vgg_jax import datasets
from vgg_jax.datasets import DatasetInfo


class Split(NamedTuple):
  """The records of a split that a pipeline reads.

  Attributes:
    name: the split.
    info: the dataset (or class subset) info.
    source: random access to the whole split.
    records: indices in ``source`` read, ascending: all of them, or those of
      the class subset.
    label_map: dataset label -> label read; None: unchanged.
  """
  name: str
  info: DatasetInfo
  source: datasets.ArrayRecordSource
  records: Sequence[int]
  label_map: np.ndarray | None

  def label(self, record: dict[str, Any]) -> np.int32:
    label = record[self.info.label_key]
    return np.int32(label if self.label_map is None else self.label_map[label])

  def encoded_and_label(self, key: int) -> tuple[bytes, np.int32]:
    """Record ``key``'s encoded image and its label."""
    record = self.source[key]
    return record[self.info.image_key], self.label(record)


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, shard: int, epoch: int, size: int) -> np.ndarray:
  """The order in which shard ``shard`` of ``size`` records is read.

  Args:
    seed: the run's seed.
    shard: the process's shard.
    epoch: the epoch, from 0.
    size: records in the shard.

  Returns:
    A permutation of ``range(size)``.
  """
  # A full permutation per epoch (5 MB and well under a second for
  # ImageNet's 1.28M), computed once per epoch and process, makes each lookup
  # O(1); Grain's index_shuffle costs up to a millisecond per lookup on small
  # datasets. The spawn key keeps this stream apart from the examples' own.
  rng = np.random.default_rng(
      np.random.SeedSequence(seed, spawn_key=(shard, epoch)))
  dtype = np.int32 if size < 2**31 else np.int64
  return rng.permutation(size).astype(dtype)
