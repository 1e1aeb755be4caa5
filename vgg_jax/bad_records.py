"""Records that cannot be decoded: skipped in training, reported once in eval.

Unreadable records never stop a run. Training replaces one by a
`SkippedRecord`, which `SkipCountingIterDataset` drops, logs with the record
id and counts in the next element's ``'skipped'``. Evaluation masks it out
and names it in the batch's ``'unreadable'`` strings (with the reason in
``'unreadable_reason'``), which `report_unreadable` turns into one warning
per record and process (the same record is read once per test scale and
mode, and once per validation pass) before handing the batch on without
them.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from absl import logging
import grain
import numpy as np

from vgg_jax.datasets import DatasetInfo


def record_id(info: DatasetInfo, split: str, key: int, record: Any) -> str:
  """``split[key]``, with the record's file name where the dataset has one."""
  name = f'{split}[{key}]'
  if info.id_key and info.id_key in record:
    value = record[info.id_key]
    if isinstance(value, bytes):
      value = value.decode('utf-8', 'replace')
    name += f' ({value})'
  return name


@dataclasses.dataclass(frozen=True)
class SkippedRecord:
  """Stands in for a record that could not be decoded.

  Attributes:
    record_id: split, index and (where the dataset has one) file name.
    reason: why decoding failed.
  """
  record_id: str
  reason: str


class SkipCountingIterDataset(grain.IterDataset):
  """Drops `SkippedRecord` elements, logging them, and counts them.

  Each element passed on gets ``'skipped'``: the number of records dropped
  since the previous element of this stream. Batching sums these, so with
  worker processes each batch reports the skips of the worker that made it.
  """

  def __init__(self, parent: grain.IterDataset, max_consecutive: int):
    """Wraps ``parent``.

    Args:
      parent: yields example dicts or `SkippedRecord`.
      max_consecutive: more skipped records in a row than this raise an error
        (a broken dataset or decoder, rather than a few bad files).
    """
    super().__init__(parent)
    self._max_consecutive = max_consecutive

  def __iter__(self) -> grain.DatasetIterator:
    return _SkipCountingIterator(self._parent.__iter__(),
                                 self._max_consecutive)


class _SkipCountingIterator(grain.DatasetIterator):
  """Iterator of `SkipCountingIterDataset`."""

  def __init__(self, parent: grain.DatasetIterator, max_consecutive: int):
    super().__init__(parent)
    self._max_consecutive = max_consecutive
    self._pending = 0

  def __next__(self) -> dict[str, Any]:
    consecutive = 0
    while True:
      element = next(self._parent)
      if not isinstance(element, SkippedRecord):
        break
      self._pending += 1
      consecutive += 1
      logging.warning('Skipping unreadable record %s: %s', element.record_id,
                      element.reason)
      if consecutive > self._max_consecutive:
        raise RuntimeError(
            f'{consecutive} records in a row could not be decoded (last: '
            f'{element.record_id}: {element.reason}); the data or its '
            'preparation looks broken (limit: '
            'config.data.max_consecutive_skips).')
    element['skipped'] = np.int32(self._pending)
    self._pending = 0
    return element

  def get_state(self) -> dict[str, Any]:
    return {'parent': self._parent.get_state(), 'pending': self._pending}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state['parent'])
    self._pending = state['pending']


def sum_skipped(batch: dict[str, Any]) -> dict[str, Any]:
  """Adds up the per-example ``'skipped'`` counts of a batch."""
  batch['skipped'] = np.int32(np.sum(batch['skipped']))
  return batch


# Unreadable evaluation records already reported by this process. Worker
# processes are new for every stream, so the reporting happens here, in the
# process that consumes the batches.
_reported: set[str] = set()
_reported_lock = threading.Lock()


def report_unreadable(batch: dict[str, Any]) -> dict[str, Any]:
  """Logs the batch's unreadable records not yet reported, then drops them.

  Args:
    batch: an evaluation batch whose ``'unreadable'`` holds, per example,
      ``'<dataset> <record id>'`` or ``''``, and ``'unreadable_reason'`` why.

  Returns:
    The batch without those two and with ``'skipped'`` summed.
  """
  names = batch.pop('unreadable').tolist()
  reasons = batch.pop('unreadable_reason').tolist()
  for name, reason in zip(names, reasons):
    if not name:
      continue
    with _reported_lock:
      if name in _reported:
        continue
      _reported.add(name)
    logging.warning('Unreadable evaluation record %s, masked out (reported '
                    'once per process): %s', name, reason)
  return sum_skipped(batch)
