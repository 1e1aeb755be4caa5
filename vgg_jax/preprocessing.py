"""Image preprocessing: robust decoding and augmentation on the host, scaling
of pixel values on the device.

Host side (PIL and NumPy, used inside Grain workers): decode any image PIL reads
into RGB uint8 with every failure turned into one `ImageDecodeError`; rescale
isotropically so the smallest side is ``S`` (training) or ``Q`` (testing);
random or central crops; horizontal flip; AlexNet's PCA colour shift
(Simonyan & Zisserman 2015, Sec. 3.1, after Krizhevsky et al. 2012).

Rescale-then-crop is done in one step: PIL resamples only the crop's region of
the source image (``Image.resize(..., box=...)``), which gives the same pixels
(up to rounding) as resizing the whole image and cropping afterwards but costs
time in proportion to the crop, and bounds the cost of extreme aspect ratios.
When the target size is at most half the stored JPEG size, the JPEG decoder
itself downscales by 1/2, 1/4 or 1/8 in the DCT domain (``Image.draft``).

Device side: `normalize` turns uint8 NHWC batches into float inputs for the
normalisation a checkpoint expects (``NORMALIZATIONS``).
"""

from __future__ import annotations

import functools
import io
import math
import os
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageOps

NORMALIZATIONS = ('mean_rgb', 'imagenet_mean_std', 'caffe_bgr')

# Mean RGB of the ILSVRC-2012 training set on a 0-255 scale (the paper
# subtracts only this; values as in the released Caffe models).
IMAGENET_MEAN_RGB = (123.68, 116.779, 103.939)

# torchvision's ImageNet statistics on RGB in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Caffe / Keras VGG weights: BGR on 0-255 minus this mean.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

# PCA of ImageNet RGB pixels on a [0, 1] scale (AlexNet's lighting noise, values
# of fb.resnet.torch). Rows are R, G, B; columns are the eigenvectors.
PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045])
PCA_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                       [-0.5808, -0.0045, -0.8140],
                       [-0.5836, -0.6948, 0.4203]])

INTERPOLATIONS = {
    'nearest': Image.Resampling.NEAREST,
    'bilinear': Image.Resampling.BILINEAR,
    'bicubic': Image.Resampling.BICUBIC,
    'lanczos': Image.Resampling.LANCZOS,
    'box': Image.Resampling.BOX,
    'hamming': Image.Resampling.HAMMING,
}

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


def _interpolation(name: str) -> Image.Resampling:
  try:
    return INTERPOLATIONS[name]
  except KeyError:
    raise ValueError(f'Unknown interpolation {name!r}; valid: '
                     f'{", ".join(INTERPOLATIONS)}.') from None


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


def rescaled_size(size: Sequence[int], scale: int) -> tuple[int, int]:
  """``(width, height)`` after isotropic rescaling to smallest side ``scale``.

  Args:
    size: ``(width, height)`` of the image.
    scale: the target smallest side (the paper's S or Q).

  Returns:
    The rescaled ``(width, height)``; the smallest side is exactly ``scale``.
  """
  width, height = size
  if width <= height:
    return scale, max(scale, round(height * scale / width))
  return max(scale, round(width * scale / height)), scale


def crop_rescaled(image: Image.Image, *, scale: int,
                  box: tuple[int, int, int, int],
                  interpolation: str = 'bilinear') -> Image.Image:
  """Crops a region of the image as if it were first rescaled.

  Equals ``image.resize(rescaled_size(image.size, scale)).crop(box)`` but only
  resamples the region that the crop keeps.

  Args:
    image: the source image.
    scale: smallest side of the (virtual) rescaled image.
    box: ``(left, top, width, height)`` in rescaled coordinates, inside the
      rescaled image.
    interpolation: a key of `INTERPOLATIONS`.

  Returns:
    The ``width x height`` crop.
  """
  left, top, width, height = box
  src_w, src_h = image.size
  dst_w, dst_h = rescaled_size(image.size, scale)
  if not (0 <= left and left + width <= dst_w and 0 <= top and
          top + height <= dst_h):
    raise ValueError(f'Crop {box} outside the rescaled image {dst_w}x{dst_h}.')
  if (dst_w, dst_h) == (src_w, src_h):
    return image.crop((left, top, left + width, top + height))
  sx, sy = dst_w / src_w, dst_h / src_h
  source_box = (left / sx, top / sy, min((left + width) / sx, src_w),
                min((top + height) / sy, src_h))
  return image.resize((width, height), _interpolation(interpolation),
                      box=source_box)


def check_scale(scale: int | Sequence[int], crop_size: int,
                what: str = 'Scale') -> None:
  """Raises ValueError unless every scale (smallest side) is at least the crop.

  Args:
    scale: one scale S or Q, or several.
    crop_size: the crop (and the net's smallest input) side.
    what: names the scales in the message (e.g. ``'Test scale'``).
  """
  scales = [scale] if isinstance(scale, (int, np.integer)) else list(scale)
  small = [int(q) for q in scales if q < crop_size]
  if small:
    raise ValueError(
        f'{what} {small[0] if len(small) == 1 else small} is smaller than '
        f'the crop (crop_size={crop_size}): the smallest side must be at '
        'least the crop (and the net\'s input) size.')


def random_crop(image: Image.Image, *, scale: int, crop_size: int,
                rng: np.random.Generator, interpolation: str = 'bilinear'
                ) -> Image.Image:
  """A uniformly placed square crop of the image rescaled to smallest side S.

  Args:
    image: the source image.
    scale: S, at least ``crop_size``.
    crop_size: side of the crop.
    rng: the per-example generator.
    interpolation: a key of `INTERPOLATIONS`.

  Returns:
    The ``crop_size x crop_size`` crop.
  """
  check_scale(scale, crop_size)
  width, height = rescaled_size(image.size, scale)
  top = int(rng.integers(0, height - crop_size + 1))
  left = int(rng.integers(0, width - crop_size + 1))
  return crop_rescaled(image, scale=scale,
                       box=(left, top, crop_size, crop_size),
                       interpolation=interpolation)


def center_crop(image: Image.Image, *, scale: int, crop_size: int,
                interpolation: str = 'bilinear') -> Image.Image:
  """The central square crop of the image rescaled to smallest side Q.

  Args:
    image: the source image.
    scale: Q, at least ``crop_size``.
    crop_size: side of the crop.
    interpolation: a key of `INTERPOLATIONS`.

  Returns:
    The ``crop_size x crop_size`` crop.
  """
  check_scale(scale, crop_size, 'Test scale')
  width, height = rescaled_size(image.size, scale)
  # Rounded like torchvision's CenterCrop.
  top = int(round((height - crop_size) / 2.0))
  left = int(round((width - crop_size) / 2.0))
  return crop_rescaled(image, scale=scale,
                       box=(left, top, crop_size, crop_size),
                       interpolation=interpolation)


def canvas_size(scale: int, max_aspect: float) -> int:
  """Side of the square canvas for full-image evaluation at scale Q.

  Args:
    scale: Q, the smallest side of the rescaled image.
    max_aspect: the longest aspect ratio kept whole; longer sides are
      centre-cropped.

  Returns:
    ``ceil(Q * max_aspect)`` rounded up to a multiple of 32 (VGG's stride).
  """
  if max_aspect < 1:
    raise ValueError(f'dense_max_aspect must be >= 1, got {max_aspect}.')
  return 32 * math.ceil(scale * max_aspect / 32 - 1e-9)


def rescale_to_canvas(image: Image.Image, *, scale: int, canvas: int,
                      interpolation: str = 'bilinear'
                      ) -> tuple[np.ndarray, tuple[int, int]]:
  """Rescales to smallest side Q and places the image top-left on a canvas.

  Args:
    image: the source image.
    scale: Q, at most ``canvas``.
    canvas: side of the square zero canvas (see `canvas_size`).
    interpolation: a key of `INTERPOLATIONS`.

  Returns:
    ``(canvas, canvas, 3)`` uint8 array and the ``(height, width)`` of the
    image on it; a side longer than the canvas is centre-cropped.
  """
  if scale > canvas:
    raise ValueError(f'Scale {scale} does not fit a {canvas} canvas.')
  width, height = rescaled_size(image.size, scale)
  crop_w, crop_h = min(width, canvas), min(height, canvas)
  region = crop_rescaled(
      image, scale=scale,
      box=((width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h),
      interpolation=interpolation)
  out = np.zeros((canvas, canvas, 3), np.uint8)
  out[:crop_h, :crop_w] = np.asarray(region)
  return out, (crop_h, crop_w)


def random_flip(image: Image.Image, rng: np.random.Generator) -> Image.Image:
  """Mirrors the image left-right with probability 1/2."""
  if rng.random() < 0.5:
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return image


def pca_color_shift(rng: np.random.Generator, sigma: float) -> np.ndarray:
  """AlexNet's per-image RGB shift along the ImageNet pixel PCA.

  Args:
    rng: the per-example generator.
    sigma: std of the Gaussian weights of the principal components.

  Returns:
    ``(3,)`` shift on the 0-255 scale, to be added to every pixel.
  """
  alpha = rng.normal(0.0, sigma, size=3)
  return PCA_EIGVEC @ (alpha * PCA_EIGVAL) * 255.0


def apply_color_shift(image: Image.Image, shift: np.ndarray) -> Image.Image:
  """Adds a per-channel shift to an RGB image, in whole levels, clipped.

  The batches stay uint8, so the shift (a few levels: sigma 0.1 gives a
  standard deviation of about 3 along the main component) is rounded to
  whole levels; pixels are clipped to 0-255.

  Args:
    image: RGB image.
    shift: ``(3,)`` values on the 0-255 scale.

  Returns:
    The shifted image (through a lookup table, in C).
  """
  levels = np.arange(256)
  table = np.clip(levels[None, :] + np.rint(np.asarray(shift))[:, None], 0,
                  255).astype(np.int64)
  return image.point(table.ravel().tolist())


def normalize(images: jnp.ndarray, normalization: str = 'mean_rgb',
              mean_rgb: Sequence[float] = IMAGENET_MEAN_RGB, *,
              dtype: jnp.dtype = jnp.float32) -> jnp.ndarray:
  """Scales uint8 RGB images the way a network's weights expect (jit-able).

  Args:
    images: ``(N, H, W, 3)`` uint8 (or float on 0-255) RGB.
    normalization: 'mean_rgb' (the paper: subtract the training-set mean RGB
      on 0-255), 'imagenet_mean_std' (torchvision: RGB in [0, 1] minus mean
      over std) or 'caffe_bgr' (Caffe/Keras: BGR on 0-255 minus
      `CAFFE_MEAN_BGR`; the channel order is reversed).
    mean_rgb: the mean for 'mean_rgb', 0-255 scale.
    dtype: output dtype.

  Returns:
    Float images of the same shape.
  """
  x = jnp.asarray(images).astype(jnp.float32)
  if normalization == 'mean_rgb':
    x = x - jnp.asarray(mean_rgb, jnp.float32)
  elif normalization == 'imagenet_mean_std':
    x = (x / 255.0 - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(
        IMAGENET_STD, jnp.float32)
  elif normalization == 'caffe_bgr':
    x = x[..., ::-1] - jnp.asarray(CAFFE_MEAN_BGR, jnp.float32)
  else:
    raise ValueError(f'Unknown normalization {normalization!r}; valid: '
                     f'{", ".join(NORMALIZATIONS)}.')
  return x.astype(dtype)


def normalizer(normalization: str = 'mean_rgb',
               mean_rgb: Sequence[float] | None = None
               ) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """``normalize`` bound to one normalisation (checked now, not at trace time).

  Args:
    normalization: one of ``NORMALIZATIONS``.
    mean_rgb: the 0-255 mean for ``'mean_rgb'``; None: ``IMAGENET_MEAN_RGB``.
  """
  if normalization not in NORMALIZATIONS:
    raise ValueError(f'Unknown normalization {normalization!r}; valid: '
                     f'{", ".join(NORMALIZATIONS)}.')
  mean = IMAGENET_MEAN_RGB if mean_rgb is None else tuple(
      float(v) for v in mean_rgb)
  return functools.partial(normalize, normalization=normalization,
                           mean_rgb=mean)
