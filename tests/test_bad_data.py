"""Unreadable and unusual images: decoded correctly, or skipped and counted."""

import functools
import io
import logging

import numpy as np
from PIL import Image
import pytest

from vgg_jax import bad_records
from vgg_jax import input_pipeline
from vgg_jax import decoding
from vgg_jax import preprocessing
from vgg_jax.configs import base
from vgg_jax.datasets import testing

_RED = (200, 30, 40)


def _solid(value=_RED, size=(24, 32)):
  return np.broadcast_to(np.asarray(value, np.uint8), size + (3,)).copy()


def _png16(value):
  buffer = io.BytesIO()
  Image.fromarray(np.full((20, 30), value, np.uint16)).save(buffer, 'PNG')
  return buffer.getvalue()


def _palette_with_transparency():
  image = Image.new('P', (30, 20), 1)
  image.putpalette([0, 0, 0, *_RED] + [0] * 762)
  image.paste(0, (0, 0, 30, 10))  # top half: index 0, transparent
  buffer = io.BytesIO()
  image.save(buffer, 'PNG', transparency=0)
  return buffer.getvalue()


def _rgba_half_transparent():
  pixels = np.zeros((20, 30, 4), np.uint8)
  pixels[..., :3] = _RED
  pixels[:10, :, 3] = 255
  return testing.encode(pixels)


# name -> (bytes, expected RGB top-left pixel, expected bottom-right pixel);
# every one of these decodes.
@functools.cache
def _decodable():
  jpeg = testing.encode(_solid(), 'JPEG', quality=95)
  return {
      'cmyk.jpg': (testing.encode(_solid(), 'JPEG', mode='CMYK', quality=95),
                   _RED, _RED),
      'sixteen_bit.png': (_png16(0x8040), (0x80,) * 3, (0x80,) * 3),
      'palette_transparent.png': (_palette_with_transparency(),
                                  (255, 255, 255), _RED),
      'rgba.png': (_rgba_half_transparent(), _RED, (255, 255, 255)),
      'grey_alpha.png': (testing.encode(np.dstack(
          [np.full((8, 8), 90, np.uint8), np.full((8, 8), 255, np.uint8)])),
                         (90,) * 3, (90,) * 3),
      'one_pixel.png': (testing.encode(np.array([[_RED]], np.uint8)), _RED,
                        _RED),
      'grey.jpg': (testing.encode(np.full((16, 16), 70, np.uint8), 'JPEG'),
                   (70,) * 3, (70,) * 3),
      'good.jpg': (jpeg, _RED, _RED),
  }


@functools.cache
def _undecodable():
  jpeg = testing.encode(np.random.default_rng(0).integers(
      0, 256, (64, 64, 3), dtype=np.uint8), 'JPEG', quality=90)
  return {
      'truncated.jpg': (jpeg[:len(jpeg) // 3], 'truncated'),
      'zero_bytes.jpg': (b'', 'empty file'),
      'not_an_image.jpg': (b'<html>404 Not Found</html>', 'not a readable'),
      'bomb.png': (testing.decompression_bomb_png(9000, 9000),
                   'decompression bomb'),
      # Past PIL's own limit too: the configured one is what refuses it.
      'bomb_header.png': (testing.decompression_bomb_png(
          30000, 30000, with_pixels=False), 'exceeds the limit of 64000000'),
  }


@pytest.mark.parametrize('name', sorted(_decodable()))
def test_unusual_images_decode_correctly(name):
  data, top_left, bottom_right = _decodable()[name]
  pixels = np.asarray(decoding.decode(data), np.int32)
  assert pixels.ndim == 3 and pixels.shape[2] == 3
  np.testing.assert_allclose(pixels[0, 0], top_left, atol=3)
  np.testing.assert_allclose(pixels[-1, -1], bottom_right, atol=3)
  # ... and go through the training ops.
  crop = preprocessing.random_crop(decoding.decode(data), scale=40,
                                   crop_size=32, rng=np.random.default_rng(0))
  assert np.asarray(crop).shape == (32, 32, 3)


@pytest.mark.parametrize('name', sorted(_undecodable()))
def test_bad_files_raise_one_clear_error(name):
  data, reason = _undecodable()[name]
  with pytest.raises(decoding.ImageDecodeError, match=reason):
    decoding.decode(data)


@pytest.fixture(scope='module')
def bad_folder(tmp_path_factory):
  files = {f'train/good/{name}': data
           for name, (data, _, _) in _decodable().items()}
  files.update({f'train/bad/{name}': data
                for name, (data, _) in _undecodable().items()})
  files.update({f'validation/{split}': data for split, data in (
      ('good/a.png', testing.encode(_solid())),
      ('good/b.jpg', testing.encode(_solid(), 'JPEG')),
      ('bad/c.jpg', b''),
      ('bad/d.png', _png16(7)[:40]))})
  root = testing.write_image_folder(tmp_path_factory.mktemp('bad'), files)
  config = base.get_config()
  config.data.dataset = 'image_folder'
  config.data.manual_dir = root
  config.data.data_dir = str(tmp_path_factory.mktemp('tfds'))
  config.data.num_workers = 0
  config.input.scale_min = 32
  config.input.scale_max = 48
  config.input.crop_size = 32
  return config


def test_training_skips_bad_records_counts_and_logs_them(bad_folder, caplog):
  num_good, num_bad = len(_decodable()), len(_undecodable())
  iterator = input_pipeline.create_train_iterator(bad_folder,
                                                  global_batch_size=4)
  with caplog.at_level(logging.WARNING):
    batches = [next(iterator) for _ in range(3 * num_good // 4)]
  state = iterator.get_state()
  iterator.close()
  reported = sum(int(b['skipped']) for b in batches)
  # Three epochs of good records went out; every record read was either
  # yielded or skipped, and skips not yet attached to a batch are pending.
  consumed = state['parent']['next_index']
  assert reported + state['pending'] == consumed - 3 * num_good
  assert reported >= 2 * num_bad
  for batch in batches:
    assert batch['image'].shape == (4, 32, 32, 3)
    assert (batch['label'] == 1).all()  # classes: bad, good
  logged = caplog.text
  for name in _undecodable():
    assert f'(train/bad/{name})' in logged


def test_training_stops_when_nothing_decodes(tmp_path):
  root = testing.write_image_folder(tmp_path / 'imgs', {
      f'train/x/{i}.jpg': b'' for i in range(5)})
  config = base.get_config()
  config.data.dataset = 'image_folder'
  config.data.manual_dir = root
  config.data.data_dir = str(tmp_path / 'tfds')
  config.data.num_workers = 0
  config.data.max_consecutive_skips = 7
  config.input.scale_min = config.input.scale_max = config.input.crop_size = 8
  iterator = input_pipeline.create_train_iterator(config, global_batch_size=2)
  with pytest.raises(RuntimeError, match='8 records in a row'):
    next(iterator)


def test_eval_masks_out_bad_images_and_counts_them(bad_folder):
  for mode in ('center_crop', 'full'):
    batches = list(input_pipeline.create_eval_iterator(
        bad_folder, scale=32, mode=mode, global_batch_size=3))
    assert len(batches) == 2
    mask = np.concatenate([b['mask'] for b in batches])
    index = np.concatenate([b['index'] for b in batches])
    assert sum(int(b['skipped']) for b in batches) == 2
    assert mask.sum() == 2  # 2 good of 4, then 2 padding slots
    assert sorted(index[index >= 0].tolist()) == [0, 1, 2, 3]
    good = np.concatenate([b['image'] for b in batches])[mask]
    np.testing.assert_allclose(good[:, 5, 5].astype(int), [_RED] * 2, atol=3)


def test_eval_reports_each_unreadable_record_once(bad_folder, caplog,
                                                  monkeypatch):
  monkeypatch.setattr(bad_records, '_reported', set())
  config = bad_folder.copy_and_resolve_references()
  with caplog.at_level(logging.WARNING):
    for scale, mode, workers in ((32, 'center_crop', 0),
                                 (40, 'center_crop', 0), (32, 'full', 1)):
      # A worker process is new for every stream: it must not report again.
      config.data.num_workers = workers
      batches = list(input_pipeline.create_eval_iterator(
          config, scale=scale, mode=mode, global_batch_size=3))
      assert sum(int(b['skipped']) for b in batches) == 2  # every pass
      assert all('unreadable' not in b for b in batches)
  for name in ('validation/bad/c.jpg', 'validation/bad/d.png'):
    assert caplog.text.count(f'({name}), masked out') == 1, caplog.text


def _bomb_config(tmp_path, max_pixels):
  root = testing.write_image_folder(tmp_path / 'imgs', {
      'validation/a/ok.png': testing.encode(_solid()),
      # 4M pixels, under PIL's own limit.
      'validation/a/bomb.png': testing.decompression_bomb_png(2000, 2000),
      # 900M pixels: PIL's own limit (179M) would refuse it first.
      'validation/a/huge.png': testing.decompression_bomb_png(
          30000, 30000, with_pixels=False),
      # 195M pixels, above PIL's limit: a larger configured one applies.
      'validation/a/large.png': testing.decompression_bomb_png(
          15000, 13000, with_pixels=False)})
  config = base.get_config()
  config.data.dataset = 'image_folder'
  config.data.manual_dir = root
  config.data.data_dir = str(tmp_path / 'tfds')
  config.data.num_workers = 0
  config.input.crop_size = 32
  config.input.max_image_pixels = max_pixels
  return config


def _eval_warnings(config, names, caplog, monkeypatch):
  """The warning about each of ``names``, the only unreadable records."""
  monkeypatch.setattr(bad_records, '_reported', set())
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    batches = list(input_pipeline.create_eval_iterator(
        config, scale=32, mode='center_crop', global_batch_size=4))
  assert sum(int(b['skipped']) for b in batches) == len(names)
  return {name: next(r.getMessage() for r in caplog.records
                     if f'(validation/a/{name})' in r.getMessage())
          for name in names}


def test_image_limit_quotes_the_configured_limit(tmp_path, caplog,
                                                 monkeypatch):
  config = _bomb_config(tmp_path, max_pixels=1_000_000)
  names = ('bomb.png', 'huge.png', 'large.png')
  for name, message in _eval_warnings(config, names, caplog,
                                      monkeypatch).items():
    assert 'exceeds the limit of 1000000' in message, (name, message)
    assert 'config.input.max_image_pixels' in message
    assert 'DecompressionBomb' not in message
  # A limit above PIL's own applies too: the 4M-pixel image decodes, the
  # big headers pass and fail only for lack of pixel data.
  config.input.max_image_pixels = 10**9
  names = ('huge.png', 'large.png')
  for name, message in _eval_warnings(config, names, caplog,
                                      monkeypatch).items():
    assert 'exceeds the limit' not in message, (name, message)
    assert 'DecompressionBomb' not in message
