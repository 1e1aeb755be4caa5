"""Fashion-MNIST as a TFDS builder that prepares offline from IDX files.

The ten-class, 28x28 grey-scale dataset of Xiao et al. (2017) is the embedded
default: the Debian package ``dataset-fashion-mnist`` installs its four IDX
files under ``/usr/share/datasets/fashion-mnist``, so preparation needs no
network. The builder writes each image as a lossless PNG (see ``_png_bytes``)
into ``array_record`` files that Grain reads with random access.

Where the IDX files are looked for, first match wins:

1. the ``source_dir`` argument (``config.data.manual_dir``);
2. the environment variable ``VGG_JAX_FASHION_MNIST_DIR``;
3. ``/usr/share/datasets/fashion-mnist`` (the Debian package).

Example::

    builder = FashionMnistIdx(data_dir='/tmp/tfds', file_format='array_record')
    builder.download_and_prepare()
    train = builder.as_data_source('train')
"""

from __future__ import annotations

import gzip
import io
import os
import struct
from typing import Iterator

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

ENV_VAR = 'VGG_JAX_FASHION_MNIST_DIR'
DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'
DEBIAN_PACKAGE = 'dataset-fashion-mnist'

CLASS_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
               'Shirt', 'Sneaker', 'Bag', 'Ankle boot')

# Split name -> (images file, labels file), without the optional '.gz'.
SPLIT_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}

_IMAGES_MAGIC = 2051  # IDX: unsigned bytes, 3 dimensions
_LABELS_MAGIC = 2049  # IDX: unsigned bytes, 1 dimension


class MissingDataError(FileNotFoundError):
  """The Fashion-MNIST IDX files are nowhere to be found."""


def _find_file(directory: str, stem: str) -> str | None:
  for name in (stem + '.gz', stem):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  return None


def candidate_dirs(source_dir: str | None = None) -> list[str]:
  """Directories searched for the IDX files, in order of preference.

  Args:
    source_dir: an explicitly configured directory, searched first.

  Returns:
    The candidate directories (explicit, environment, Debian default).
  """
  dirs = []
  if source_dir:
    dirs.append(os.path.expanduser(source_dir))
  if os.environ.get(ENV_VAR):
    dirs.append(os.path.expanduser(os.environ[ENV_VAR]))
  dirs.append(DEBIAN_DIR)
  return dirs


def find_idx_files(source_dir: str | None = None) -> dict[str, tuple[str, str]]:
  """Locates the four IDX files (plain or gzipped).

  An explicitly given ``source_dir`` must hold them: it is not silently
  replaced by the other locations.

  Args:
    source_dir: directory from the config, or None to use the environment
      variable and then the Debian package location.

  Returns:
    Split name -> (images path, labels path).

  Raises:
    MissingDataError: with instructions for getting the files.
  """
  searched = candidate_dirs(source_dir)
  if source_dir:
    searched = searched[:1]
  missing = []
  for directory in searched:
    found, missing = {}, []
    for split, stems in SPLIT_FILES.items():
      paths = tuple(_find_file(directory, stem) for stem in stems)
      missing += [s + '[.gz]' for s, p in zip(stems, paths) if p is None]
      found[split] = paths
    if not missing:
      return found
  wanted = ', '.join(s + '.gz' for stems in SPLIT_FILES.values() for s in stems)
  raise MissingDataError(
      'Fashion-MNIST IDX files not found (looked in '
      f'{", ".join(searched)}; missing in the last: {", ".join(missing)}). '
      f'Get them with `sudo apt-get install {DEBIAN_PACKAGE}` (installs them '
      f'into {DEBIAN_DIR}), or put {wanted} (from '
      'https://github.com/zalandoresearch/fashion-mnist) into a directory and '
      f'pass it as --config.data.manual_dir=DIR or ${ENV_VAR}=DIR.')


def _read_idx(path: str, magic: int) -> np.ndarray:
  """Reads an IDX file of unsigned bytes into an array of its stated shape."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  if len(data) < 8:
    raise ValueError(f'{path}: too short for an IDX file ({len(data)} bytes).')
  found_magic = struct.unpack('>i', data[:4])[0]
  if found_magic != magic:
    raise ValueError(f'{path}: IDX magic number {found_magic}, expected '
                     f'{magic}; is this the right file?')
  ndim = magic & 0xFF
  shape = struct.unpack(f'>{ndim}i', data[4:4 + 4 * ndim])
  offset = 4 + 4 * ndim
  size = int(np.prod(shape))
  if len(data) - offset != size:
    raise ValueError(f'{path}: header says {shape} ({size} bytes) but '
                     f'{len(data) - offset} bytes follow; truncated file?')
  return np.frombuffer(data, np.uint8, offset=offset).reshape(shape)


def read_split(images_path: str, labels_path: str
               ) -> tuple[np.ndarray, np.ndarray]:
  """Reads one split: images (N, 28, 28) uint8 and labels (N,) uint8."""
  images = _read_idx(images_path, _IMAGES_MAGIC)
  labels = _read_idx(labels_path, _LABELS_MAGIC)
  if len(images) != len(labels):
    raise ValueError(f'{images_path} holds {len(images)} images but '
                     f'{labels_path} {len(labels)} labels.')
  if labels.size and labels.max() >= len(CLASS_NAMES):
    raise ValueError(f'{labels_path}: label {labels.max()} out of range '
                     f'0..{len(CLASS_NAMES) - 1}.')
  return images, labels


def _png_bytes(image: np.ndarray) -> bytes:
  # PNG keeps the pixels exactly and lets every source reach the pipeline as
  # encoded bytes through one decoder; a 28x28 PNG decodes in microseconds.
  buffer = io.BytesIO()
  Image.fromarray(image, mode='L').save(buffer, format='PNG')
  return buffer.getvalue()


class FashionMnistIdx(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST prepared from local IDX files (no download)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'PNG-encoded images from the IDX files.'}

  def __init__(self, *, source_dir: str | None = None, **kwargs):
    """Creates the builder.

    Args:
      source_dir: directory with the IDX files; see the module docstring for
        the fallbacks. Only read when preparing.
      **kwargs: passed to `tfds.core.GeneratorBasedBuilder` (data_dir,
        file_format, ...).
    """
    self._source_dir = source_dir
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017): 28x28 '
        'grey-scale images of Zalando articles in 10 classes; 60,000 '
        'training and 10,000 test images.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(28, 28, 1),
                                         encoding_format='png'),
            'label': tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/zalandoresearch/fashion-mnist',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    files = find_idx_files(self._source_dir)
    return {split: self._generate_examples(*paths)
            for split, paths in files.items()}

  def _generate_examples(self, images_path: str, labels_path: str
                         ) -> Iterator[tuple[int, dict]]:
    images, labels = read_split(images_path, labels_path)
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {'image': _png_bytes(image), 'label': int(label)}
