"""Writers of small synthetic datasets, for tests and benchmarks.

Nothing here downloads: every file is made from NumPy arrays with PIL (or, for
the IDX and decompression-bomb files, byte by byte).

Example::

    root = write_image_folder(tmp_path / 'images', {
        'train/cat/1.png': encode(np.zeros((8, 8, 3), np.uint8)),
        'train/dog/2.jpg': encode(np.ones((8, 8, 3), np.uint8), 'JPEG'),
    })
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import zlib
from typing import Mapping

import numpy as np
from PIL import Image

from vgg_jax.datasets import fashion_mnist


def encode(pixels: np.ndarray, image_format: str = 'PNG', *,
           mode: str | None = None, **save_kwargs) -> bytes:
  """Encodes an array with PIL.

  Args:
    pixels: ``(H, W)`` or ``(H, W, C)`` array.
    image_format: PIL format name ('PNG', 'JPEG', ...).
    mode: PIL mode to convert to before saving (e.g. 'CMYK', 'P').
    **save_kwargs: passed to ``Image.save`` (quality, transparency, ...).

  Returns:
    The encoded bytes.
  """
  image = Image.fromarray(pixels)
  if mode is not None and image.mode != mode:
    image = image.convert(mode)
  buffer = io.BytesIO()
  image.save(buffer, format=image_format, **save_kwargs)
  return buffer.getvalue()


def write_image_folder(root: str | os.PathLike,
                       files: Mapping[str, bytes]) -> str:
  """Writes ``{'split/class/name': bytes}`` under ``root``.

  Args:
    root: directory to create.
    files: relative path -> file contents.

  Returns:
    ``root`` as a string.
  """
  root = os.fspath(root)
  for rel, data in files.items():
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(data)
  return root


def write_idx_files(directory: str | os.PathLike,
                    splits: Mapping[str, tuple[np.ndarray, np.ndarray]],
                    compress: bool = True) -> str:
  """Writes Fashion-MNIST style IDX files.

  Args:
    directory: where to write.
    splits: 'train' / 'test' -> (images (N, 28, 28) uint8, labels (N,) uint8).
    compress: write ``.gz`` files, as the Debian package ships them.

  Returns:
    ``directory`` as a string.
  """
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  for split, (images, labels) in splits.items():
    images_stem, labels_stem = fashion_mnist.SPLIT_FILES[split]
    for stem, array, magic in ((images_stem, images, 2051),
                               (labels_stem, labels, 2049)):
      array = np.ascontiguousarray(array, np.uint8)
      header = struct.pack('>i', magic) + struct.pack(
          f'>{array.ndim}i', *array.shape)
      data = header + array.tobytes()
      path = os.path.join(directory, stem + ('.gz' if compress else ''))
      with (gzip.open if compress else open)(path, 'wb') as f:
        f.write(data)
  return directory


def ramp_image(width: int, height: int) -> np.ndarray:
  """RGB image whose red rises 4 per column and green 4 per row (from 0).

  After any isotropic rescale to smallest side S of a square ramp of side n,
  the red slope per pixel is ``4 * n / S``: tests read S back from it.

  Args:
    width: columns (at most 64, so values stay below 256).
    height: rows (at most 64).

  Returns:
    ``(height, width, 3)`` uint8; blue is 128.
  """
  if width > 64 or height > 64:
    raise ValueError('ramp_image sides must be at most 64.')
  x = np.arange(width) * 4
  y = np.arange(height) * 4
  image = np.empty((height, width, 3), np.uint8)
  image[..., 0] = x[None, :]
  image[..., 1] = y[:, None]
  image[..., 2] = 128
  return image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
  return (struct.pack('>I', len(data)) + kind + data +
          struct.pack('>I', zlib.crc32(kind + data)))


def decompression_bomb_png(width: int, height: int,
                           with_pixels: bool = True) -> bytes:
  """A tiny grey PNG that claims (and, with pixels, holds) width x height.

  Args:
    width: claimed width.
    height: claimed height.
    with_pixels: compress all-zero rows (the file is then a real image of
      ~1/1000 of its decoded size); without, only the header is written.

  Returns:
    The PNG bytes.
  """
  header = _png_chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 0, 0,
                                           0, 0))
  body = b''
  if with_pixels:
    compressor = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0, then zero pixels
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    body = _png_chunk(b'IDAT', b''.join(parts))
  return b'\x89PNG\r\n\x1a\n' + header + body + _png_chunk(b'IEND', b'')
