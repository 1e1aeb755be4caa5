"""Image files to RGB: robust decoding with one error type.

Decodes any image PIL reads (JPEG, PNG, GIF, BMP, TIFF, WebP, 16-bit, CMYK,
palettes, transparency) into RGB, with every failure (empty, truncated,
unknown format, decompression bomb, unconvertible mode) turned into one
`ImageDecodeError` whose message says why. A JPEG that will be downscaled
anyway may be decoded at 1/2, 1/4 or 1/8 size in the DCT domain
(``Image.draft``). ``vgg_jax.preprocessing`` crops and rescales the result.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
from PIL import Image
from PIL import ImageOps

# Decoded images larger than this are refused before decoding (decompression
# bombs); below Pillow's own warning limit of 89.5M pixels.
DEFAULT_MAX_PIXELS = 64_000_000
# Transparent pixels are composited onto white, the usual page background of
# images with an alpha channel (logos, product photos).
ALPHA_BACKGROUND = (255, 255, 255)

_SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N')

# `open_image` refuses images over its max_pixels (config.input.
# max_image_pixels) from their header. PIL's own global limit (2 x 89.5M
# pixels) would otherwise refuse larger ones first, quoting its limit instead
# of the configured one, and refuse images a larger configured limit accepts.
Image.MAX_IMAGE_PIXELS = None


class ImageDecodeError(ValueError):
  """An image could not be decoded; the message says why."""


def open_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS
               ) -> Image.Image:
  """Reads an image's header (pixels are decoded later, on first use).

  Args:
    data: the encoded image.
    max_pixels: larger images are refused (decompression bombs).

  Returns:
    The lazily decoded PIL image.

  Raises:
    ImageDecodeError: empty data, an unknown format, a zero or too large size.
  """
  if not data:
    raise ImageDecodeError('empty file (0 bytes)')
  try:
    image = Image.open(io.BytesIO(data))
  except Exception as e:  # PIL raises many types for corrupt headers.
    raise ImageDecodeError(f'not a readable image ({type(e).__name__}: '
                           f'{e})') from e
  width, height = image.size
  if width < 1 or height < 1:
    raise ImageDecodeError(f'image has size {width}x{height}')
  if width * height > max_pixels:
    raise ImageDecodeError(
        f'image of {width}x{height} = {width * height} pixels exceeds the '
        f'limit of {max_pixels} (decompression bomb?); raise '
        'config.input.max_image_pixels to accept it')
  return image


def to_rgb(image: Image.Image) -> Image.Image:
  """Converts any PIL mode to RGB (loading the pixels).

  Grey becomes three equal channels, 16-bit grey keeps its 8 high bits,
  transparency is composited onto `ALPHA_BACKGROUND`, CMYK and palettes are
  converted by PIL.

  Args:
    image: a PIL image in any mode.

  Returns:
    An RGB image.
  """
  mode = image.mode
  if mode == 'RGB':
    image.load()
    return image
  if mode in _SIXTEEN_BIT_MODES or mode in ('I', 'F'):
    pixels = np.asarray(image)
    if mode == 'F':
      pixels = pixels * 255.0 if pixels.max(initial=0) <= 1.0 else pixels
    elif mode in _SIXTEEN_BIT_MODES or pixels.max(initial=0) > 255:
      pixels = pixels.astype(np.int64) >> 8  # 0-65535 onto 0-255
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode='L').convert('RGB')
  if image.has_transparency_data:
    background = Image.new('RGBA', image.size, ALPHA_BACKGROUND + (255,))
    return Image.alpha_composite(background, image.convert('RGBA')).convert(
        'RGB')
  return image.convert('RGB')


def decode(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
           min_side: int | None = None, exif_transpose: bool = False
           ) -> Image.Image:
  """Decodes an encoded image into an RGB PIL image.

  Args:
    data: encoded image bytes (JPEG, PNG, GIF, BMP, TIFF, WebP, ...).
    max_pixels: larger images are refused before decoding.
    min_side: if given, a JPEG may be decoded at 1/2, 1/4 or 1/8 size as long
      as its smallest side stays at least ``min_side`` (faster, and the image
      is downscaled to about that size anyway).
    exif_transpose: rotate/flip as the EXIF orientation tag says (photos from
      phones); off for datasets, as in other ImageNet pipelines.

  Returns:
    The decoded RGB image, pixels loaded.

  Raises:
    ImageDecodeError: for any unreadable, truncated, empty, oversized or
      unconvertible image.
  """
  image = open_image(data, max_pixels=max_pixels)
  try:
    if min_side and image.format == 'JPEG':
      width, height = image.size
      scale = min_side / min(width, height)
      if scale <= 0.5:
        image.draft(None, (math.ceil(width * scale),
                           math.ceil(height * scale)))
    if exif_transpose:
      image = ImageOps.exif_transpose(image)
    return to_rgb(image)
  except Exception as e:  # Truncated data, bad chunks, unsupported modes...
    raise ImageDecodeError(f'cannot decode {image.format} {image.mode} '
                           f'{image.size[0]}x{image.size[1]} image '
                           f'({type(e).__name__}: {e})') from e


def load_image(path_or_bytes: str | os.PathLike | bytes, *,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Loads an image file (or bytes) as an RGB uint8 array, e.g. for predict.

  The EXIF orientation is applied, so phone photos come out upright.

  Args:
    path_or_bytes: a file path or the encoded bytes.
    max_pixels: larger images are refused.

  Returns:
    ``(height, width, 3)`` uint8 array.

  Raises:
    FileNotFoundError: the path does not exist.
    ImageDecodeError: the file is not a decodable image (message names it).
  """
  if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
    data, name = bytes(path_or_bytes), '<bytes>'
  else:
    name = os.fspath(path_or_bytes)
    with open(name, 'rb') as f:
      data = f.read()
  try:
    image = decode(data, max_pixels=max_pixels, exif_transpose=True)
  except ImageDecodeError as e:
    raise ImageDecodeError(f'{name}: {e}') from e
  return np.asarray(image)
