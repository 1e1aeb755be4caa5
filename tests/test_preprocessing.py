"""Host-side image ops and device-side normalisation."""

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from conftest import smooth_image
from vgg_jax import preprocessing
from vgg_jax.datasets import testing


@pytest.mark.parametrize('size,scale,expected', [
    ((500, 375), 256, (341, 256)),
    ((375, 500), 256, (256, 341)),
    ((256, 256), 384, (384, 384)),
    ((1, 1000), 224, (224, 224000)),
    ((28, 28), 32, (32, 32)),
])
def test_rescaled_size_sets_smallest_side(size, scale, expected):
  assert preprocessing.rescaled_size(size, scale) == expected


@pytest.mark.parametrize('width,height,scale', [
    (50, 40, 32), (40, 50, 57), (64, 64, 100), (90, 31, 48), (31, 90, 31)])
def test_crop_rescaled_matches_resize_then_crop(width, height, scale):
  image = Image.fromarray(smooth_image(width, height))
  full = image.resize(preprocessing.rescaled_size(image.size, scale),
                      Image.Resampling.BILINEAR)
  rng = np.random.default_rng(1)
  for _ in range(5):
    crop = 24
    left = int(rng.integers(0, full.size[0] - crop + 1))
    top = int(rng.integers(0, full.size[1] - crop + 1))
    want = np.asarray(full.crop((left, top, left + crop, top + crop)),
                      np.int32)
    got = np.asarray(preprocessing.crop_rescaled(
        image, scale=scale, box=(left, top, crop, crop)), np.int32)
    assert got.shape == (crop, crop, 3)
    # PIL rounds between its two passes, so a pixel may differ by 2.
    assert np.abs(got - want).max() <= 2
    assert np.abs(got - want).mean() < 0.1


def test_crop_rescaled_rejects_boxes_outside_the_image():
  image = Image.new('RGB', (40, 30))
  with pytest.raises(ValueError, match='outside'):
    preprocessing.crop_rescaled(image, scale=30, box=(20, 0, 24, 24))


def test_random_crops_stay_inside_the_image():
  rng = np.random.default_rng(0)
  for _ in range(40):
    width, height = rng.integers(1, 120, size=2)
    image = Image.new('RGB', (int(width), int(height)), (200, 100, 50))
    scale = int(rng.integers(32, 80))
    crop = preprocessing.random_crop(image, scale=scale, crop_size=32, rng=rng)
    pixels = np.asarray(crop)
    assert pixels.shape == (32, 32, 3)
    # Any pixel from outside the image would not be the image's colour.
    assert (pixels == (200, 100, 50)).all()


def test_random_crop_positions_cover_the_rescaled_image():
  image = Image.fromarray(testing.ramp_image(64, 16))  # rescaled: 128 x 32
  rng = np.random.default_rng(0)
  lefts = set()
  for _ in range(200):
    crop = np.asarray(preprocessing.random_crop(image, scale=32, crop_size=32,
                                                rng=rng))
    lefts.add(int(crop[16, 0, 0]))
  # Red rises 2 per rescaled column; crops start all over 0..96.
  assert min(lefts) < 10 and max(lefts) > 180


def test_center_crop_is_central():
  image = Image.fromarray(testing.ramp_image(64, 32))  # rescaled to 128 x 64
  crop = np.asarray(preprocessing.center_crop(image, scale=64, crop_size=32),
                    np.float64)
  # Columns 48..79 of 128: red is about 2 * 63.5 around the middle.
  assert abs(crop[:, :, 0].mean() - 127) < 3
  assert abs(crop[:, :, 1].mean() - 63) < 3
  with pytest.raises(ValueError, match='smaller than the crop'):
    preprocessing.center_crop(image, scale=16, crop_size=32)


@pytest.mark.parametrize('scale,aspect,expected', [
    (256, 1.5, 384), (384, 1.5, 576), (512, 1.5, 768), (224, 1.5, 352),
    (256, 4 / 3, 352), (32, 1.0, 32), (33, 1.0, 64)])
def test_canvas_size(scale, aspect, expected):
  assert preprocessing.canvas_size(scale, aspect) == expected


@pytest.mark.parametrize('size,valid', [
    ((60, 40), (64, 96)),     # landscape 3:2 fits the 96 canvas
    ((40, 60), (96, 64)),     # portrait
    ((120, 40), (64, 96)),    # 3:1: longer side cropped to the canvas
    ((1, 1), (64, 64)),
])
def test_rescale_to_canvas(size, valid):
  image = Image.new('RGB', size, (10, 20, 30))
  canvas, got = preprocessing.rescale_to_canvas(image, scale=64, canvas=96)
  assert canvas.shape == (96, 96, 3) and canvas.dtype == np.uint8
  assert got == valid
  h, w = valid
  assert (canvas[:h, :w] == (10, 20, 30)).all()
  assert not canvas[h:].any() and not canvas[:, w:].any()


def test_random_flip_mirrors_about_half_the_time():
  image = Image.fromarray(testing.ramp_image(8, 8))
  rng = np.random.default_rng(0)
  flips = 0
  for _ in range(400):
    out = np.asarray(preprocessing.random_flip(image, rng))
    if out[0, 0, 0] != 0:
      np.testing.assert_array_equal(out, np.asarray(image)[:, ::-1])
      flips += 1
  assert 150 < flips < 250


def test_pca_color_shift_has_alexnet_covariance():
  rng = np.random.default_rng(0)
  shifts = np.stack([preprocessing.pca_color_shift(rng, 0.1)
                     for _ in range(20000)])
  assert shifts.shape == (20000, 3)
  vec, val = preprocessing.PCA_EIGVEC, preprocessing.PCA_EIGVAL
  expected = vec @ np.diag((0.1 * val * 255) ** 2) @ vec.T
  np.testing.assert_allclose(np.cov(shifts.T), expected, atol=0.15, rtol=0.05)
  assert np.abs(shifts.mean(0)).max() < 0.1
  assert not preprocessing.pca_color_shift(rng, 0.0).any()


def test_normalize_modes():
  images = np.array([[[[255, 128, 0]]]], np.uint8)  # (1, 1, 1, 3)
  mean = (120.0, 110.0, 100.0)
  np.testing.assert_allclose(
      preprocessing.normalize(images, 'mean_rgb', mean)[0, 0, 0],
      [135, 18, -100])
  np.testing.assert_allclose(
      preprocessing.normalize(images, 'imagenet_mean_std')[0, 0, 0],
      (np.array([1.0, 128 / 255, 0.0]) - (0.485, 0.456, 0.406)) /
      (0.229, 0.224, 0.225), rtol=1e-5)
  # BGR order: blue first.
  np.testing.assert_allclose(
      preprocessing.normalize(images, 'caffe_bgr')[0, 0, 0],
      [0 - 103.939, 128 - 116.779, 255 - 123.68], rtol=1e-5)
  with pytest.raises(ValueError, match='Unknown normalization'):
    preprocessing.normalize(images, 'zscore')
  assert set(preprocessing.NORMALIZATIONS) == {'mean_rgb', 'imagenet_mean_std',
                                               'caffe_bgr'}


def test_apply_color_shift_rounds_and_clips():
  pixels = np.array([[[0, 100, 255], [250, 3, 128]]], np.uint8)
  out = np.asarray(preprocessing.apply_color_shift(
      Image.fromarray(pixels), np.array([6.4, -4.6, 0.2])))
  np.testing.assert_array_equal(out, [[[6, 95, 255], [255, 0, 128]]])


def test_normalize_jits_to_any_dtype():
  images = np.full((2, 3, 3, 3), 100, np.uint8)
  fn = jax.jit(lambda x: preprocessing.normalize(
      x, 'mean_rgb', (100.0, 99.0, 101.0), dtype=jnp.bfloat16))
  out = fn(images)
  assert out.dtype == jnp.bfloat16 and out.shape == images.shape
  np.testing.assert_array_equal(np.asarray(out[1, 2, 0], np.float32),
                                [0, 1, -1])
