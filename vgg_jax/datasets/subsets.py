"""Class subsets: train or evaluate on some of a dataset's classes.

``config.data.classes`` names the classes kept, by name (str) or index (int),
e.g. ``('Coat', 'Bag')`` or ``(0, 1, 2, 3, 4)``; class ``i`` of the subset is
the ``i``-th given, so labels become ``0..k-1`` in that order. Empty: every
class, unchanged. `subset_info` describes the subset (k classes, their names,
examples per split); `subset_records` lists a split's records of those
classes and `label_map` remaps their labels. Only labels are read
(`ArrayRecordSource.labels`, cached beside the prepared dataset), never an
image.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

from vgg_jax import datasets
from vgg_jax.datasets import DatasetInfo

MAX_NAMES_SHOWN = 50  # an error lists this many valid names (ImageNet: 1000)


def select_classes(info: DatasetInfo, classes: Sequence[str | int]
                   ) -> tuple[int, ...]:
  """The dataset labels of a class subset, in the order given.

  Args:
    info: the whole dataset's info.
    classes: class names (str) or indices (int).

  Returns:
    The label of each class given.

  Raises:
    ValueError: a name or index the dataset lacks (naming it and the valid
      ones), a class given twice, or a bare string.
  """
  if isinstance(classes, (str, bytes)):
    raise ValueError(f'config.data.classes must be a sequence of class names '
                     f'or indices, not the string {classes!r}; write '
                     f'({classes!r},).')
  labels = []
  for c in classes:
    label = _label_of(info, c)
    if label in labels:
      raise ValueError(f'config.data.classes names class {label} '
                       f'({info.class_names[label]!r}) twice.')
    labels.append(label)
  return tuple(labels)


def _label_of(info: DatasetInfo, name_or_index: str | int) -> int:
  """The label of one class, given by name or index."""
  c = name_or_index
  if isinstance(c, (int, np.integer)) and not isinstance(c, bool):
    if not 0 <= c < info.num_classes:
      raise ValueError(f'Class index {c} not in [0, {info.num_classes}) of '
                       f'dataset {info.name} (config.data.classes).')
    return int(c)
  if isinstance(c, str) and c in info.class_names:
    return info.class_names.index(c)
  shown = ', '.join(repr(n) for n in info.class_names[:MAX_NAMES_SHOWN])
  if info.num_classes > MAX_NAMES_SHOWN:
    shown += f' and {info.num_classes - MAX_NAMES_SHOWN} more'
  raise ValueError(f'Dataset {info.name} has no class {c!r} '
                   f'(config.data.classes); its classes are {shown}.')


def subset_info(builder: tfds.core.DatasetBuilder, info: DatasetInfo,
                classes: Sequence[str | int]) -> DatasetInfo:
  """``info`` restricted to a class subset: k classes, per-split counts.

  Args:
    builder: the prepared builder.
    info: its whole `DatasetInfo`.
    classes: names or indices (`select_classes`); empty: all classes.

  Returns:
    ``info`` itself for all classes; else the subset's class names (class
    ``i`` is ``classes[i]``), examples per split and ``source_labels``.
  """
  if not classes:
    return info
  labels = select_classes(info, classes)
  counts = {}
  for split in info.num_examples:
    every = datasets.data_source(builder, split, info).labels(info.label_key)
    counts[split] = int(np.isin(every, labels).sum())
  return dataclasses.replace(
      info, num_classes=len(labels), num_examples=counts, source_labels=labels,
      class_names=tuple(info.class_names[label] for label in labels))


def subset_records(source: datasets.ArrayRecordSource, info: DatasetInfo
                   ) -> Sequence[int]:
  """Indices of ``source``'s records in ``info``'s classes, ascending.

  Args:
    source: one split (`data_source`).
    info: from `subset_info`.

  Returns:
    ``range(len(source))`` for all classes, else an int64 array.
  """
  if info.source_labels is None:
    return range(len(source))
  every = source.labels(info.label_key)
  return np.flatnonzero(np.isin(every, info.source_labels))


def label_map(info: DatasetInfo) -> np.ndarray | None:
  """Dataset label -> subset label (-1: not in it); None for all classes."""
  if info.source_labels is None:
    return None
  mapping = np.full(max(info.source_labels) + 1, -1, np.int32)
  mapping[list(info.source_labels)] = np.arange(len(info.source_labels))
  return mapping
