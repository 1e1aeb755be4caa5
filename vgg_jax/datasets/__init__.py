"""Dataset sources for vgg_jax: TFDS datasets stored as ``array_record`` files.

``config.data.dataset`` picks the source:

* ``'fashion_mnist'``: `fashion_mnist.FashionMnistIdx`, prepared offline from
  the IDX files of the Debian package ``dataset-fashion-mnist`` (or
  ``config.data.manual_dir`` / ``$VGG_JAX_FASHION_MNIST_DIR``).
* ``'image_folder'``: `image_folder.ImageFolderDataset` over
  ``config.data.manual_dir`` laid out as ``<split>/<class>/<image>``.
* any other name: that TFDS dataset (e.g. ``'imagenet2012'``), prepared with
  ``file_format='array_record'`` and ``config.data.manual_dir`` as manual dir.

Preparation happens once, into ``config.data.data_dir`` (TFDS default:
``~/tensorflow_datasets``), with TFDS's progress bars; ``python -m
vgg_jax.datasets.prepare`` does it ahead of time. Preparation survives kills
and concurrent runs (`ensure_prepared`): a dataset is read only once complete.
`data_source` then gives Grain random access to a split (`ArrayRecordSource`,
the equivalent of ``tfds.data_source(..., decoders={'image':
tfds.decode.SkipDecoding()})`` with a faster single-record read). Records
come back with the image still encoded (bytes), so the input pipeline decodes
it with its own robust decoder.
Neither preparing the package's own builders nor reading needs TensorFlow.

Class subsets (``config.data.classes``) are `subsets`; they read only labels
(`ArrayRecordSource.labels`): a file's labels are parsed once from its
records, without the images, and cached in a ``vgg_jax_labels`` folder next
to the prepared files (and in memory), so later runs find them at once.
"""

from __future__ import annotations

import bisect
from concurrent import futures
import contextlib
import dataclasses
import fcntl
import functools
import itertools
import os
import threading
from typing import Any, Iterator, Mapping

from absl import logging
from array_record.python import array_record_module
from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import constants
from tensorflow_datasets.core import file_adapters
from tensorflow_datasets.core import registered
from tensorflow_datasets.proto import tf_example_pb2

from vgg_jax import paths
from vgg_jax.datasets import fashion_mnist
from vgg_jax.datasets import image_folder

FASHION_MNIST = 'fashion_mnist'
IMAGE_FOLDER = 'image_folder'
FILE_FORMAT = 'array_record'
LABELS_DIR = 'vgg_jax_labels'  # label caches, next to the prepared files


class DamagedDatasetError(ValueError):
  """A prepared dataset is incomplete or one of its files is unreadable.

  The message names the file and how to repair it. A ValueError, so command
  lines report it on one line.
  """


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know about a dataset.

  Attributes:
    name: the dataset's TFDS name (with config, if any).
    num_classes: number of classes.
    class_names: class names, index = label.
    num_examples: split name -> number of examples.
    image_key: feature holding the encoded image.
    label_key: feature holding the integer label.
    id_key: feature naming each record (e.g. its file), or None.
    source_labels: for a class subset, the dataset's label of each class
      (class ``i`` is dataset label ``source_labels[i]``); None: all classes.
  """
  name: str
  num_classes: int
  class_names: tuple[str, ...]
  num_examples: Mapping[str, int]
  image_key: str = 'image'
  label_key: str = 'label'
  id_key: str | None = None
  source_labels: tuple[int, ...] | None = None


def get_builder(dataset: str, *, data_dir: str | None = None,
                manual_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Creates (without preparing) the TFDS builder of a dataset.

  Args:
    dataset: 'fashion_mnist', 'image_folder' or a TFDS name.
    data_dir: TFDS data dir; None for the TFDS default.
    manual_dir: IDX directory, image-folder root or TFDS manual dir.

  Returns:
    The builder, set to write and read ``array_record`` files.
  """
  kwargs = dict(data_dir=data_dir, file_format=FILE_FORMAT)
  if dataset == FASHION_MNIST:
    return fashion_mnist.FashionMnistIdx(source_dir=manual_dir, **kwargs)
  if dataset == IMAGE_FOLDER:
    if not manual_dir:
      raise ValueError("dataset 'image_folder' needs the root directory "
                       '(root/<split>/<class>/<image>) in '
                       '--config.data.manual_dir.')
    return image_folder.ImageFolderDataset(root=manual_dir, **kwargs)
  try:
    return tfds.builder(dataset, **kwargs)
  except registered.DatasetNotFoundError as e:
    raise ValueError(
        f'Unknown dataset {dataset!r}: use {FASHION_MNIST!r}, '
        f'{IMAGE_FOLDER!r} or a TFDS dataset name.') from e


def is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
  """Whether the builder's files are already in its data dir."""
  return builder.is_prepared()


def ensure_prepared(builder: tfds.core.DatasetBuilder,
                    manual_dir: str | None = None) -> None:
  """Prepares the dataset once (no-op when already prepared).

  Safe against kills and concurrent runs. TFDS writes into an
  ``incomplete.*`` directory that is renamed into place when complete, so a
  killed preparation leaves no dataset that looks prepared; the next one
  deletes that leftover and starts again. Processes sharing a data dir (the
  hosts of a multi-host job) take turns on a lock file in it: the first
  prepares, the others wait and then read what it wrote. On object stores
  (gs://), which cannot lock, prepare once beforehand (``python -m
  vgg_jax.datasets.prepare``).

  Args:
    builder: from `get_builder`.
    manual_dir: the TFDS manual dir (ImageNet tars); ignored by the package's
      own builders, which take their directory at construction.

  Raises:
    DamagedDatasetError: the dataset's directory exists but holds no
      complete dataset.
  """
  if not is_prepared(builder):
    with _preparation_lock(builder):
      if not is_prepared(builder):
        _prepare_locked(builder, manual_dir)
        return
  if not builder.info.splits:
    # Another process prepared it after this builder was made, which then
    # knows no splits yet: read what that process wrote.
    builder.info.read_from_directory(builder.data_dir)


def _prepare_locked(builder: tfds.core.DatasetBuilder,
                    manual_dir: str | None) -> None:
  if builder.data_path.exists():
    raise DamagedDatasetError(
        f'{builder.data_path} exists but holds no complete prepared dataset '
        '(no dataset_info.json or features.json); delete it and prepare '
        'again (python -m vgg_jax.datasets.prepare).')
  _remove_interrupted(builder)
  download_config = None
  own = isinstance(builder, (fashion_mnist.FashionMnistIdx,
                             image_folder.ImageFolderDataset))
  if manual_dir and not own:
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  try:
    builder.download_and_prepare(file_format=FILE_FORMAT,
                                 download_config=download_config)
  except AssertionError as e:
    # TFDS asserts when a manual-download dataset (ImageNet) lacks its files.
    if 'manual' not in str(e).lower():
      raise
    raise FileNotFoundError(
        f'{builder.name} needs files downloaded by hand: '
        f'{" ".join(str(e).split())} Pass their directory as '
        '--config.data.manual_dir (python -m vgg_jax.datasets.prepare '
        '--manual_dir for preparing alone).') from None


@contextlib.contextmanager
def _preparation_lock(builder: tfds.core.DatasetBuilder) -> Iterator[None]:
  """Holds an exclusive lock on preparing ``builder``'s dataset version."""
  root = epath.Path(builder.data_dir_root)
  if '://' in os.fspath(root):
    logging.warning(
        'Cannot lock %s against concurrent preparation; if several processes '
        'start at once, prepare it beforehand (python -m '
        'vgg_jax.datasets.prepare).', root)
    yield
    return
  root.mkdir(parents=True, exist_ok=True)
  name = '-'.join(builder.data_path.relative_to(root).parts)
  path = os.fspath(root / f'.{name}.prepare.lock')
  # The kernel releases the lock when its holder dies, kill -9 included; the
  # file itself stays (deleting it would let two holders lock two files).
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      logging.warning('Waiting for another process preparing %s (lock %s).',
                      builder.data_path, path)
      fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # Releases the lock.


def _remove_interrupted(builder: tfds.core.DatasetBuilder) -> None:
  """Deletes what killed preparations of this version left (under the lock)."""
  target = builder.data_path
  pattern = f'{constants.INCOMPLETE_PREFIX}*_{target.name}'
  for leftover in target.parent.glob(pattern):
    logging.warning('Deleting %s, left by an interrupted preparation.',
                    leftover)
    leftover.rmtree()


def _supervised_keys(info: tfds.core.DatasetInfo) -> tuple[str, str]:
  keys = info.supervised_keys
  if keys and len(keys) == 2 and all(isinstance(k, str) for k in keys):
    image_key, label_key = keys
  else:
    image_key, label_key = 'image', 'label'
  features = info.features
  if image_key not in features or label_key not in features:
    raise ValueError(f'Dataset {info.name} has no (image, label) features '
                     f'(features: {list(features.keys())}).')
  if not isinstance(features[image_key], tfds.features.Image):
    raise ValueError(f'Dataset {info.name}: feature {image_key!r} is not an '
                     'image.')
  if not isinstance(features[label_key], tfds.features.ClassLabel):
    raise ValueError(f'Dataset {info.name}: feature {label_key!r} is not a '
                     'class label.')
  return image_key, label_key


def dataset_info(builder: tfds.core.DatasetBuilder) -> DatasetInfo:
  """Summarises a prepared builder's info."""
  info = builder.info
  image_key, label_key = _supervised_keys(info)
  id_key = next((k for k in ('file_name', 'id') if k in info.features), None)
  label = info.features[label_key]
  return DatasetInfo(
      name=builder.info.full_name.rsplit('/', 1)[0],
      num_classes=label.num_classes,
      class_names=tuple(label.names),
      num_examples={name: split.num_examples
                    for name, split in info.splits.items()},
      image_key=image_key, label_key=label_key, id_key=id_key)


class ArrayRecordSource:
  """Random access to one split of a prepared ``array_record`` TFDS dataset.

  Reads like ``builder.as_data_source(split)`` and deserialises with the
  dataset's own features, but fetches one record with a seek and a read on a
  reader without background threads: about 7 us per record, where the
  ``array_record`` data source's batched read costs some 300 us for a single
  record. Readers open lazily and are shared by threads under a lock; the
  object pickles without them, so Grain workers reopen the files.
  """

  _READER_OPTIONS = 'readahead_buffer_size:0,max_parallelism:0'

  def __init__(self, info: tfds.core.DatasetInfo, split: str,
               decoders: Mapping[str, Any] | None = None):
    """Locates the split's records.

    Args:
      info: the prepared builder's info.
      split: split name or TFDS slice ('validation[:1000]').
      decoders: TFDS decoders, e.g. ``{'image': tfds.decode.SkipDecoding()}``.
    """
    self._features = info.features
    self._decoders = decoders
    self._name = f'{info.full_name}/{split}'
    # (path, first record, record count) for each shard of the split.
    self._files = [(os.fspath(f.filename), f.skip, f.take)
                   for f in info.splits[split].file_instructions]
    self._ends = list(itertools.accumulate(n for _, _, n in self._files))
    self._init_readers()

  def _init_readers(self) -> None:
    self._readers = [None] * len(self._files)
    self._locks = [threading.Lock() for _ in self._files]

  def __getstate__(self) -> dict[str, Any]:
    state = self.__dict__.copy()
    del state['_readers'], state['_locks']
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._init_readers()

  def __len__(self) -> int:
    return self._ends[-1] if self._ends else 0

  def __repr__(self) -> str:
    return f'ArrayRecordSource({self._name}, {len(self)} records)'

  def read_raw(self, key: int) -> bytes:
    """The serialised record ``key`` (0 <= key < len)."""
    if not 0 <= key < len(self):
      raise IndexError(f'Record {key} out of range [0, {len(self)}) of '
                       f'{self._name}.')
    i = bisect.bisect_right(self._ends, key)
    path, skip, _ = self._files[i]
    position = skip + key - (self._ends[i - 1] if i else 0)
    with self._locks[i]:
      try:
        if self._readers[i] is None:
          self._readers[i] = array_record_module.ArrayRecordReader(
              path, self._READER_OPTIONS)
        reader = self._readers[i]
        reader.seek(position)
        return reader.read()
      except RuntimeError as e:  # How array_record reports any I/O failure.
        # One message naming the file; the original's text is in it.
        raise DamagedDatasetError(
            f'Cannot read record {position} of {path} ({e}). The prepared '
            f'dataset {self._name} is damaged or was deleted while in use: '
            f'delete {os.path.dirname(path)} and prepare it again (python -m '
            'vgg_jax.datasets.prepare).') from None

  def __getitem__(self, key: int) -> Any:
    return self._features.deserialize_example_np(
        self.read_raw(int(key)), decoders=self._decoders)

  def labels(self, label_key: str) -> np.ndarray:
    """Every record's label, int32 (len,), read once per file and cached.

    Args:
      label_key: the integer label feature.
    """
    if not self._files:
      return np.zeros(0, np.int32)
    # Threads overlap the first reading of many files (ImageNet has 1024).
    with futures.ThreadPoolExecutor(min(16, len(self._files))) as pool:
      parts = pool.map(functools.partial(_shard_labels, label_key=label_key),
                       self._files)
      return np.concatenate(list(parts))


def _shard_labels(shard: tuple[str, int, int], label_key: str) -> np.ndarray:
  """Labels of a split's records in one file: (path, first, count)."""
  path, skip, take = shard
  return _file_labels(path, label_key, skip + take)[skip:skip + take]


# (file, label feature) -> labels of all its records, for this process.
_labels: dict[tuple[str, str], np.ndarray] = {}
_labels_lock = threading.Lock()


def _file_labels(path: str, label_key: str, min_records: int) -> np.ndarray:
  """The labels of one ``array_record`` file's records, read only once.

  Cached in memory and in ``LABELS_DIR`` beside the file: a prepared
  dataset never changes, and a new preparation replaces its whole folder.

  Args:
    path: the file.
    label_key: the integer label feature.
    min_records: a cache with fewer labels than this is stale and reread.
  """
  with _labels_lock:
    labels = _labels.get((path, label_key))
  if labels is not None and len(labels) >= min_records:
    return labels
  cache = epath.Path(path).parent / LABELS_DIR / (
      f'{os.path.basename(path)}.{label_key}.npy')
  try:
    with cache.open('rb') as f:
      labels = np.load(f)
  except (OSError, ValueError, EOFError):  # not cached yet, or damaged
    labels = None
  if labels is None or len(labels) < min_records:
    labels = _read_labels(path, label_key)
    try:
      with paths.replaced_atomically(cache, overwrite=True) as tmp:
        with tmp.open('wb') as f:
          np.save(f, labels)
    except OSError as e:  # e.g. a read-only dataset: keep them in memory
      logging.warning('Cannot cache labels in %s (%s).', cache, e)
  with _labels_lock:
    _labels[(path, label_key)] = labels
  return labels


def _read_labels(path: str, label_key: str, chunk: int = 4096
                 ) -> np.ndarray:
  """Reads the labels of one file, parsing each record but no image."""
  # Once per file and dataset; ImageNet's 1024 files log every 10 s.
  logging.log_every_n_seconds(
      logging.INFO, 'Reading the labels of %s (once: cached in %s).', 10,
      path, LABELS_DIR)
  try:
    reader = array_record_module.ArrayRecordReader(path)
    try:
      count = reader.num_records()
      labels = np.empty(count, np.int32)
      for start in range(0, count, chunk):
        for i, raw in enumerate(reader.read(start, min(count, start + chunk))):
          # TFDS stores a ClassLabel as a tf.Example int64 scalar; parsing
          # just the proto is 10x faster than deserialising the features.
          feature = tf_example_pb2.Example.FromString(raw).features.feature
          labels[start + i] = feature[label_key].int64_list.value[0]
    finally:
      reader.close()
  except (RuntimeError, IndexError) as e:  # I/O failure, or no label
    raise DamagedDatasetError(
        f'Cannot read the labels {label_key!r} of {path} ({e}): delete '
        f'{os.path.dirname(path)} and prepare it again (python -m '
        'vgg_jax.datasets.prepare).') from None
  return labels


def data_source(builder: tfds.core.DatasetBuilder, split: str,
                info: DatasetInfo) -> ArrayRecordSource:
  """A random-access source of one split; images stay encoded bytes.

  Args:
    builder: a prepared builder.
    split: split name or TFDS slice ('train', 'validation[:1000]', ...).
    info: the builder's `DatasetInfo`.

  Returns:
    A picklable sequence of dicts (Grain workers reopen its files).
  """
  base = split.split('[', 1)[0]
  if base not in info.num_examples:
    raise ValueError(f'Dataset {info.name} has no split {base!r}; its splits '
                     f'are {sorted(info.num_examples)}.')
  formats = builder.info.available_file_formats()
  if file_adapters.FileFormat.ARRAY_RECORD not in formats:
    raise ValueError(
        f'Dataset {info.name} in {builder.data_dir} is stored as '
        f'{sorted(f.value for f in formats)}, not {FILE_FORMAT}; prepare it '
        f'again with file_format={FILE_FORMAT!r} (python -m '
        'vgg_jax.datasets.prepare) into another data_dir.')
  if builder.info.file_format != file_adapters.FileFormat.ARRAY_RECORD:
    builder.info.set_file_format(file_adapters.FileFormat.ARRAY_RECORD,
                                 override=True, override_if_initialized=True)
  decoders = {info.image_key: tfds.decode.SkipDecoding()}
  return ArrayRecordSource(builder.info, split, decoders=decoders)
