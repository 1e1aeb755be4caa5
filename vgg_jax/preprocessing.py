"""Image preprocessing: augmentation on the host, scaling of pixel values on
the device.

Host side (PIL and NumPy, used inside Grain workers, on images from
``vgg_jax.decoding``): rescale isotropically so the smallest side is ``S``
(training) or ``Q`` (testing); random or central crops; horizontal flip; AlexNet's PCA colour shift
(Simonyan & Zisserman 2015, Sec. 3.1, after Krizhevsky et al. 2012).

Rescale-then-crop is done in one step: PIL resamples only the crop's region of
the source image (``Image.resize(..., box=...)``), which gives the same pixels
(up to rounding) as resizing the whole image and cropping afterwards but costs
time in proportion to the crop, and bounds the cost of extreme aspect ratios.

Device side: `normalize` turns uint8 NHWC batches into float inputs for the
normalisation a checkpoint expects (``NORMALIZATIONS``).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image

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

def _interpolation(name: str) -> Image.Resampling:
  try:
    return INTERPOLATIONS[name]
  except KeyError:
    raise ValueError(f'Unknown interpolation {name!r}; valid: '
                     f'{", ".join(INTERPOLATIONS)}.') from None


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
