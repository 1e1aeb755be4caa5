"""Decoding image files to RGB: modes, JPEG draft, EXIF, errors."""

import io

import numpy as np
from PIL import Image
import pytest

from conftest import smooth_image

from vgg_jax import decoding
from vgg_jax import preprocessing
from vgg_jax.datasets import testing


def test_decode_grey_palette_alpha_and_16_bit():
  grey = decoding.decode(testing.encode(np.full((4, 5), 77, np.uint8)))
  assert np.asarray(grey).shape == (4, 5, 3) and (np.asarray(grey) == 77).all()
  sixteen = io.BytesIO()
  Image.fromarray(np.full((3, 3), 0xC000, np.uint16)).save(sixteen, 'PNG')
  assert (np.asarray(decoding.decode(sixteen.getvalue())) == 0xC0).all()
  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[..., 0] = 255
  rgba[:2, ..., 3] = 255  # top half opaque red, bottom transparent
  out = np.asarray(decoding.decode(testing.encode(rgba)))
  assert (out[:2] == (255, 0, 0)).all() and (out[2:] == 255).all()


def test_jpeg_draft_decodes_smaller_but_not_below_min_side():
  data = testing.encode(smooth_image(800, 600), 'JPEG', quality=90)
  full = decoding.decode(data)
  assert full.size == (800, 600)
  half = decoding.decode(data, min_side=256)   # 600 / 2 = 300 >= 256
  assert half.size == (400, 300)
  quarter = decoding.decode(data, min_side=100)
  assert quarter.size == (200, 150)
  assert decoding.decode(data, min_side=400).size == (800, 600)
  # The crop is nearly the same as from the fully decoded image.
  rng = np.random.default_rng
  a = np.asarray(preprocessing.random_crop(full, scale=256, crop_size=224,
                                           rng=rng(0)), np.float64)
  b = np.asarray(preprocessing.random_crop(half, scale=256, crop_size=224,
                                           rng=rng(0)), np.float64)
  assert np.abs(a - b).mean() < 3


def test_load_image_path_bytes_and_exif(tmp_path):
  pixels = np.zeros((10, 20, 3), np.uint8)
  pixels[:, :10] = 255
  image = Image.fromarray(pixels)
  exif = image.getexif()
  exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
  path = tmp_path / 'photo.jpg'
  image.save(path, 'JPEG', exif=exif, quality=95)
  loaded = decoding.load_image(path)
  assert loaded.shape == (20, 10, 3) and loaded.dtype == np.uint8
  np.testing.assert_array_equal(decoding.load_image(path.read_bytes()),
                                loaded)
  (tmp_path / 'notes.jpg').write_text('not an image')
  with pytest.raises(decoding.ImageDecodeError, match='notes.jpg'):
    decoding.load_image(tmp_path / 'notes.jpg')
  with pytest.raises(FileNotFoundError):
    decoding.load_image(tmp_path / 'missing.png')
