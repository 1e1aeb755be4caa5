"""A TFDS builder for your own images laid out as ``root/<split>/<class>/<file>``.

Example layout::

    flowers/train/daisy/0001.jpg
    flowers/train/tulip/0002.png
    flowers/validation/daisy/0101.jpg

Every sub-directory of ``root`` is a split, every sub-directory of a split a
class; class names are the sorted union of the class folders of all splits, so
a class missing from one split keeps its label. Images are stored with their
original encoded bytes (nothing is decoded or re-encoded here, and TensorFlow
is not needed); unreadable files are kept and skipped later by the input
pipeline, which counts and logs them. Files whose extension is not an image
extension (``README.txt``, ``.DS_Store``) are ignored.

The prepared copy lives in ``<data_dir>/image_folder_dataset/<root name>-<hash
of the absolute root path>``; it is made once, so delete that directory to
re-prepare after changing the images.

Example::

    builder = ImageFolderDataset(root='flowers', data_dir='/tmp/tfds',
                                 file_format='array_record')
    builder.download_and_prepare()
    print(builder.info.features['label'].names)
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Iterator

import tensorflow_datasets as tfds

IMAGE_EXTENSIONS = frozenset({
    '.jpg', '.jpeg', '.jpe', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff',
    '.ppm', '.pgm', '.pbm', '.pnm'})

_SPLIT_NAME = re.compile(r'^\w+$')


def _is_image_file(name: str) -> bool:
  return (not name.startswith('.') and
          os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS)


def _subdirs(path: str) -> list[str]:
  return sorted(e.name for e in os.scandir(path)
                if e.is_dir() and not e.name.startswith('.'))


def scan_layout(root: str) -> tuple[list[str], list[str]]:
  """Lists the splits and classes of an image-folder root.

  Args:
    root: directory holding ``<split>/<class>/<image>``.

  Returns:
    (split names, sorted class names).

  Raises:
    FileNotFoundError: root is missing.
    ValueError: the layout has no split or no class, or a split name that TFDS
      cannot use.
  """
  if not os.path.isdir(root):
    raise FileNotFoundError(
        f'Image-folder root {root!r} is not a directory; expected '
        'root/<split>/<class>/<image> (set it with --config.data.manual_dir).')
  splits = _subdirs(root)
  if not splits:
    raise ValueError(f'Image-folder root {root!r} has no split directories; '
                     'expected root/<split>/<class>/<image>, e.g. '
                     'root/train/cat/1.jpg.')
  bad = [s for s in splits if not _SPLIT_NAME.match(s)]
  if bad:
    raise ValueError(f'Split directories {bad} under {root!r} must be named '
                     'with letters, digits and underscores only.')
  classes = sorted({c for s in splits for c in _subdirs(os.path.join(root, s))})
  if not classes:
    raise ValueError(f'No class directories under the splits {splits} of '
                     f'{root!r}; expected root/<split>/<class>/<image>.')
  return splits, classes


def config_name(root: str) -> str:
  """A TFDS config name unique to the absolute path of ``root``."""
  path = os.path.abspath(os.path.expanduser(root))
  base = re.sub(r'[^\w.-]+', '_', os.path.basename(path.rstrip(os.sep))) or 'root'
  digest = hashlib.sha1(path.encode()).hexdigest()[:8]
  return f'{base}-{digest}'


def list_split(root: str, split: str, classes: list[str]
               ) -> list[tuple[str, str]]:
  """(relative path, class name) of every image file of a split, sorted."""
  files = []
  for class_name in classes:
    class_dir = os.path.join(root, split, class_name)
    if not os.path.isdir(class_dir):
      continue
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
      for name in sorted(filenames):
        if _is_image_file(name):
          rel = os.path.relpath(os.path.join(dirpath, name), root)
          files.append((rel, class_name))
  return files


class ImageFolderDataset(tfds.core.GeneratorBasedBuilder):
  """Images from ``root/<split>/<class>/<image>``, stored as encoded bytes."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Original encoded bytes, class from folder name.'}

  def __init__(self, *, root: str, **kwargs):
    """Creates the builder for one root directory.

    Args:
      root: the directory holding ``<split>/<class>/<image>``.
      **kwargs: passed to `tfds.core.GeneratorBasedBuilder` (data_dir,
        file_format, ...); ``config`` is derived from ``root``.
    """
    self._root = os.path.abspath(os.path.expanduser(root))
    self._splits, self._classes = scan_layout(self._root)
    config = tfds.core.BuilderConfig(
        name=config_name(self._root), version=self.VERSION,
        description=f'Images under {self._root}')
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=f'Image folder {self._root}: splits {self._splits}.',
        features=tfds.features.FeaturesDict({
            # No encoding_format: any format PIL reads is accepted as is.
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.ClassLabel(names=self._classes),
            'file_name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    generators = {}
    for split in self._splits:
      files = list_split(self._root, split, self._classes)
      if not files:
        raise ValueError(
            f'Split {split!r} of {self._root!r} holds no image files (known '
            f'extensions: {", ".join(sorted(IMAGE_EXTENSIONS))}).')
      generators[split] = self._generate_examples(files)
    return generators

  def _generate_examples(self, files: list[tuple[str, str]]
                         ) -> Iterator[tuple[str, dict]]:
    for rel, class_name in files:
      with open(os.path.join(self._root, rel), 'rb') as f:
        data = f.read()
      yield rel, {'image': data, 'label': class_name, 'file_name': rel}
