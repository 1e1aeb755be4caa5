"""Multi-scale rescale, crop and flip on the device, for splits held in memory.

With ``config.input.augment_on_device`` the host no longer resamples: it
sends each batch's source images from a split held in memory (`in_memory`)
with their records and epochs; `Augmentation`, inside the jitted train step,
draws S, the crop's place, the flip and the PCA colour shift from them and
cuts the crops. On a CPU this frees the cores the input workers took from
the step (BENCHMARKS.md, the training loop); on an accelerator the work is
negligible.

The augmentation is the host path's (`input_pipeline`): isotropic rescale to
smallest side S drawn uniformly from ``[scale_min, scale_max]`` (bilinear,
antialiased when shrinking), a uniform crop, a left-right flip with
probability 1/2, the colour shift in whole levels, each result rounded to
uint8 as PIL does; crops equal PIL's to one level
(``tests/test_device_augment.py``). As on the host path the draws come from
``(seed, record, epoch)`` alone, so they do not change with the process or
device count, though they are other numbers (JAX's generator, not NumPy's).
Every image of the split must have the same size, as in datasets whose
decoded images fit in memory (Fashion-MNIST, CIFAR); only bilinear
resampling is offered.

Host batch::

    {'image': uint8 (B, H, W, 3), 'label': int32 (B,),
     'record': int32 (B,),  # the record's index in the split
     'epoch': int32 (B,)}   # the epoch it is read in
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from vgg_jax import preprocessing

# The one resampling filter whose jax.image result matches PIL's.
INTERPOLATION = 'bilinear'
# Folded into the seed's key: the augmentation's draws never meet dropout's
# (``fold_in(seed, step)``).
_STREAM = 0x617567


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """The paper's training augmentation of a host batch, on the device.

  Each image's draws come from ``(seed, record, epoch)``, as on the host
  path: they do not depend on the batch, the process count or the device
  count. Called inside the jitted train step: ``batch -> uint8 crops``.
  """
  seed: int
  scale_min: int  # S_min
  scale_max: int  # S_max
  crop_size: int
  random_flip: bool
  pca_sigma: float

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'Augmentation':
    cfg = config.input
    return cls(config.seed, cfg.scale_min, cfg.scale_max, cfg.crop_size,
               bool(cfg.random_flip), float(cfg.pca_sigma))

  def draws(self, record: jax.Array, epoch: jax.Array,
            image_hw: tuple[int, int]) -> dict[str, jax.Array]:
    """One image's ``size``, ``offset``, ``flip`` and ``shift`` (vmap it)."""
    key = jax.random.fold_in(jax.random.key(self.seed), _STREAM)
    key = jax.random.fold_in(jax.random.fold_in(key, record), epoch)
    k_scale, k_top, k_left, k_flip, k_shift = jax.random.split(key, 5)
    scale = jax.random.randint(k_scale, (), self.scale_min,
                               self.scale_max + 1)
    # The rescaled (height, width) of every S, from the host path's own
    # rounding: the source size is static, so this is a constant table.
    height, width = image_hw
    sizes = jnp.array([preprocessing.rescaled_size((width, height), s)[::-1]
                       for s in range(self.scale_min, self.scale_max + 1)],
                      jnp.int32)
    size = sizes[scale - self.scale_min]
    top = jax.random.randint(k_top, (), 0, size[0] - self.crop_size + 1)
    left = jax.random.randint(k_left, (), 0, size[1] - self.crop_size + 1)
    flip = jax.random.bernoulli(k_flip) & self.random_flip
    alpha = jax.random.normal(k_shift, (3,)) * self.pca_sigma
    shift = jnp.rint(jnp.asarray(preprocessing.PCA_EIGVEC, jnp.float32) @ (
        alpha * jnp.asarray(preprocessing.PCA_EIGVAL, jnp.float32)) * 255.0)
    return {'size': size, 'offset': jnp.stack([top, left]), 'flip': flip,
            'shift': shift}

  def __call__(self, batch: dict[str, jax.Array]) -> jax.Array:
    draws = jax.vmap(functools.partial(
        self.draws, image_hw=batch['image'].shape[1:3]))(batch['record'],
                                                         batch['epoch'])
    return crops({'image': batch['image'], **draws}, self.crop_size)


def _crop_one(image: jax.Array, size: jax.Array, offset: jax.Array,
              flip: jax.Array, shift: jax.Array, crop_size: int) -> jax.Array:
  height, width, channels = image.shape
  scale = size.astype(jnp.float32) / jnp.array([height, width], jnp.float32)
  # Output pixel o samples rescaled pixel o + offset: the crop is resampled
  # alone, never the whole rescaled image.
  out = jax.image.scale_and_translate(
      image.astype(jnp.float32), (crop_size, crop_size, channels), (0, 1),
      scale, -offset.astype(jnp.float32), method='linear', antialias=True)
  # uint8 levels, rounded half up as PIL does.
  out = jnp.clip(jnp.floor(out + 0.5), 0, 255)
  out = jnp.where(flip, out[:, ::-1], out)
  return jnp.clip(out + shift, 0, 255).astype(jnp.uint8)


def crops(batch: dict[str, Any], crop_size: int) -> jax.Array:
  """Training crops of source images with given draws, uint8 ``(B, c, c, 3)``.

  Args:
    batch: ``image`` (B, H, W, 3) and the draws of `Augmentation.draws`
      stacked: ``size`` (B, 2), ``offset`` (B, 2), ``flip`` (B,),
      ``shift`` (B, 3).
    crop_size: side of the crops.
  """
  return jax.vmap(_crop_one, in_axes=(0, 0, 0, 0, 0, None))(
      batch['image'], batch['size'], batch['offset'], batch['flip'],
      batch['shift'], crop_size)


def batch_spec(batch_size: int, image_shape: Sequence[int]
               ) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of a global host batch of ``batch_size`` images of one shape."""
  spec = jax.ShapeDtypeStruct
  return {'image': spec((batch_size, *image_shape), jnp.uint8),
          'label': spec((batch_size,), jnp.int32),
          'record': spec((batch_size,), jnp.int32),
          'epoch': spec((batch_size,), jnp.int32)}
