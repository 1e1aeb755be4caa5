"""Training and evaluation pipelines on small image folders written here."""

import numpy as np
import pytest
from PIL import Image
from conftest import restore_iterator_state

from vgg_jax import input_pipeline
from vgg_jax import preprocessing
from vgg_jax.configs import base
from vgg_jax.datasets import testing

RAMP = 64  # side of the ramp images: red = 4 * column, green = 4 * row


@pytest.fixture(scope='module')
def ramp_root(tmp_path_factory):
  png = testing.encode(testing.ramp_image(RAMP, RAMP))
  files = {f'{split}/{c}/{i}.png': png
           for split, n in (('train', 12), ('validation', 5))
           for c in ('a', 'b') for i in range(n)}
  return testing.write_image_folder(tmp_path_factory.mktemp('ramp'), files)


@pytest.fixture(scope='module')
def ids_root(tmp_path_factory):
  """40 classes of one training image each: the label names the record."""
  files = {}
  for i in range(40):
    png = testing.encode(np.full((8, 8, 3), i, np.uint8))
    files[f'train/c{i:02d}/x.png'] = png
  for i in range(23):
    files[f'validation/c{i % 40:02d}/v{i}.png'] = testing.encode(
        np.full((6, 9, 3), i, np.uint8))
  return testing.write_image_folder(tmp_path_factory.mktemp('ids'), files)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def _config(root, data_dir, **input_overrides):
  config = base.get_config()
  config.seed = 3
  config.data.dataset = 'image_folder'
  config.data.manual_dir = root
  config.data.data_dir = data_dir
  config.data.num_workers = 0
  config.data.read_threads = 1
  config.data.read_buffer_size = 8
  config.input.scale_min = 32
  config.input.scale_max = 64
  config.input.crop_size = 32
  config.input.random_flip = False
  config.input.pca_sigma = 0.0
  config.train.batch_size = 8
  config.train.eval_batch_size = 8
  config.input.update(input_overrides)
  return config


def _batches(iterator, n):
  batches = [next(iterator) for _ in range(n)]
  iterator.close()
  return batches


def _scales(images):
  """Reads S back from ramp crops: the red slope per pixel is 4 * RAMP / S."""
  red = images[..., 0].astype(np.float64)
  green = images[..., 1].astype(np.float64)
  slope_x = np.median((red[:, :, -3] - red[:, :, 2]) / (images.shape[2] - 5),
                      axis=1)
  slope_y = np.median((green[:, -3] - green[:, 2]) / (images.shape[1] - 5),
                      axis=1)
  # Isotropic rescaling: both axes agree (up to a flip of x).
  np.testing.assert_allclose(np.abs(slope_x), slope_y, rtol=0.05)
  return 4 * RAMP / slope_y, np.sign(slope_x)


def test_train_batch_shapes_and_dtypes(ramp_root, data_dir):
  config = _config(ramp_root, data_dir)
  batch = _batches(input_pipeline.create_train_iterator(config), 1)[0]
  assert set(batch) == {'image', 'label', 'skipped'}
  assert batch['image'].shape == (8, 32, 32, 3)
  assert batch['image'].dtype == np.uint8
  assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
  assert batch['skipped'].shape == () and batch['skipped'] == 0
  assert set(batch['label']) <= {0, 1}


def test_scale_is_drawn_per_image_within_range(ramp_root, data_dir):
  config = _config(ramp_root, data_dir)
  images = np.concatenate([b['image'] for b in _batches(
      input_pipeline.create_train_iterator(config), 6)])
  scales, signs = _scales(images)
  assert scales.min() > 32 - 1.5 and scales.max() < 64 + 1.5
  assert scales.max() - scales.min() > 20  # really varies
  assert (signs > 0).all()  # no flips when random_flip is off


def test_fixed_scale(ramp_root, data_dir):
  config = _config(ramp_root, data_dir, scale_min=48, scale_max=48)
  images = _batches(input_pipeline.create_train_iterator(config), 2)
  scales, _ = _scales(np.concatenate([b['image'] for b in images]))
  np.testing.assert_allclose(scales, 48, atol=1.5)


def test_flip_and_color_shift(ramp_root, data_dir):
  plain = _batches(input_pipeline.create_train_iterator(
      _config(ramp_root, data_dir, random_flip=True)), 3)
  shifted = _batches(input_pipeline.create_train_iterator(
      _config(ramp_root, data_dir, random_flip=True, pca_sigma=0.1)), 3)
  _, signs = _scales(np.concatenate([b['image'] for b in plain]))
  assert (signs > 0).any() and (signs < 0).any()
  shifts = []
  for a, b in zip(plain, shifted):
    # The colour shift is drawn after the geometry: same crops and flips.
    diff = b['image'].astype(int) - a['image'].astype(int)
    for image, delta in zip(a['image'], diff):
      for c in range(3):
        unclipped = delta[..., c][(image[..., c] > 40) & (image[..., c] < 215)]
        assert unclipped.size and (unclipped == unclipped[0]).all()
        shifts.append(unclipped[0])
  shifts = np.array(shifts)
  # A few levels per image and channel, not all zero (sigma 0.1).
  assert np.abs(shifts).max() < 30 and np.count_nonzero(shifts) > len(shifts) / 2


def test_same_seed_same_batches_other_seed_others(ramp_root, data_dir):
  config = _config(ramp_root, data_dir, random_flip=True)
  first = _batches(input_pipeline.create_train_iterator(config), 2)
  again = _batches(input_pipeline.create_train_iterator(config), 2)
  config.seed = 4
  other = _batches(input_pipeline.create_train_iterator(config), 2)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a['image'], b['image'])
  assert any(not np.array_equal(a['image'], c['image'])
             for a, c in zip(first, other))


def test_process_shards_are_disjoint_and_cover_the_split(ids_root, data_dir):
  config = _config(ids_root, data_dir, scale_min=8, scale_max=8, crop_size=8)
  count = 3
  epoch = {}
  for index in range(count):
    shard_size = len(range(index, 40, count))
    iterator = input_pipeline.create_train_iterator(
        config, global_batch_size=count, process_index=index,
        process_count=count)
    batches = _batches(iterator, 2 * shard_size)
    labels = [int(b['label'][0]) for b in batches]
    assert all(b['image'].shape == (1, 8, 8, 3) for b in batches)
    epoch[index] = labels[:shard_size]
    # An epoch holds each record once, and the next epoch the same records.
    assert len(set(epoch[index])) == shard_size
    assert set(labels[shard_size:]) == set(epoch[index])
  all_labels = [label for labels in epoch.values() for label in labels]
  assert sorted(all_labels) == list(range(40))


@pytest.mark.parametrize('mode', ['center_crop', 'full'])
@pytest.mark.parametrize('process_count,global_batch', [
    (1, 8), (2, 8), (3, 6), (4, 4), (5, 40)])
def test_eval_counts_every_example_once(ids_root, data_dir, mode,
                                        process_count, global_batch):
  config = _config(ids_root, data_dir, crop_size=8, dense_max_aspect=1.0)
  expected = input_pipeline.num_eval_batches(
      config, global_batch_size=global_batch, process_count=process_count)
  assert expected == -(-23 // global_batch)
  seen = []
  for index in range(process_count):
    batches = list(input_pipeline.create_eval_iterator(
        config, scale=8, mode=mode, global_batch_size=global_batch,
        process_index=index, process_count=process_count))
    assert len(batches) == expected
    for batch in batches:
      assert batch['image'].shape[0] == global_batch // process_count
      assert batch['mask'].dtype == bool
      seen += batch['index'][batch['mask']].tolist()
      if mode == 'full':
        valid = batch['valid_size']
        assert (valid[batch['mask']] == (8, 12)).all()
        assert not valid[~batch['mask']].any()
      assert (batch['index'][~batch['mask']] == -1).all()
      # Each image is uniform with the value of its label.
      for image, i in zip(batch['image'][batch['mask']],
                          batch['label'][batch['mask']]):
        if mode == 'full':
          assert (image[:8, :12] == i).all() and not image[8:].any()
        else:
          assert (image == i).all()
  assert sorted(seen) == list(range(23))


def test_eval_scale_q_is_honoured(ramp_root, data_dir):
  config = _config(ramp_root, data_dir)
  for q in (40, 64):
    batch = next(input_pipeline.create_eval_iterator(
        config, scale=q, mode='center_crop', global_batch_size=4))
    assert batch['image'].shape == (4, 32, 32, 3)
    scales, _ = _scales(batch['image'])
    np.testing.assert_allclose(scales, q, atol=1.5)
  canvas = preprocessing.canvas_size(48, config.input.dense_max_aspect)
  batch = next(input_pipeline.create_eval_iterator(
      config, scale=48, mode='full', global_batch_size=4))
  assert batch['image'].shape == (4, canvas, canvas, 3) and canvas == 96
  assert batch['valid_size'].dtype == np.int32
  np.testing.assert_array_equal(batch['valid_size'], [[48, 48]] * 4)
  # The ramp fills the top-left 48 x 48, zeros elsewhere.
  assert batch['image'][:, 47, 47, 0].min() > 200
  assert not batch['image'][:, 48:].any() and not batch['image'][:, :, 48:].any()


def test_checkpoint_restore_through_orbax(ramp_root, data_dir, tmp_path):
  config = _config(ramp_root, data_dir, random_flip=True, pca_sigma=0.1)
  config.train.batch_size = 4
  iterator = input_pipeline.create_train_iterator(config)
  for _ in range(5):
    next(iterator)
  restored = input_pipeline.create_train_iterator(config)
  restore_iterator_state(iterator, restored, tmp_path / 'ckpt')
  want = _batches(iterator, 6)  # crosses into the third epoch
  fresh = input_pipeline.create_train_iterator(config)
  got = _batches(restored, 6)
  for a, b in zip(want, got):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(_batches(fresh, 1)[0]['image'], want[0]['image'])


def test_worker_process_gives_the_in_process_batches(tmp_path, data_dir):
  png = testing.encode(testing.ramp_image(40, 30))
  root = testing.write_image_folder(tmp_path / 'imgs', {
      **{f'train/a/{i}.png': png for i in range(6)},
      'train/b/empty.jpg': b'',
      'train/b/truncated.png': png[:len(png) // 2]})
  config = _config(root, data_dir, random_flip=True, pca_sigma=0.1)
  config.train.batch_size = 4
  in_process = _batches(input_pipeline.create_train_iterator(config), 5)
  config.data.num_workers = 1
  workers = _batches(input_pipeline.create_train_iterator(config), 5)
  for a, b in zip(in_process, workers):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # 20 good examples span more than 3 epochs of 6 good and 2 bad records.
  assert sum(int(b['skipped']) for b in workers) >= 6


def test_decoded_cache_gives_the_uncached_batches(tmp_path, data_dir):
  png = testing.encode(testing.ramp_image(40, 30))
  root = testing.write_image_folder(tmp_path / 'imgs', {
      **{f'train/a/{i}.png': png for i in range(6)},
      'train/b/truncated.png': png[:len(png) // 2]})
  config = _config(root, data_dir, random_flip=True, pca_sigma=0.1)
  config.train.batch_size = 4
  uncached = _batches(input_pipeline.create_train_iterator(config), 6)
  config.data.cache_decoded_mb = 1.0
  for workers in (0, 1):
    config.data.num_workers = workers
    cached = _batches(input_pipeline.create_train_iterator(config), 6)
    # Over 3 epochs of 6 good records and an unreadable one: the cache
    # serves repeats and still skips the bad record every epoch.
    for a, b in zip(uncached, cached):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_decoded_cache_keeps_to_its_budget():
  image = Image.new('RGB', (10, 10))
  cache = input_pipeline.DecodedCache(budget_bytes=2 * 300 + 299)
  for key in range(5):
    cache.put(key, image, np.int32(key))
  assert [cache.get(k) is not None for k in range(5)] == [True, True, False,
                                                          False, False]
  assert not input_pipeline.DecodedCache(0)


def test_config_errors(ramp_root, data_dir):
  config = _config(ramp_root, data_dir, scale_min=16)
  with pytest.raises(ValueError, match='input.scale_min 16 is smaller than '
                     'the crop'):
    input_pipeline.create_train_iterator(config)
  config = _config(ramp_root, data_dir, scale_max=40)
  config.input.scale_min = 48
  with pytest.raises(ValueError, match='scale_min 48 exceeds'):
    input_pipeline.create_train_iterator(config)
  config = _config(ramp_root, data_dir)
  with pytest.raises(ValueError, match='multiple of the process count 3'):
    input_pipeline.create_train_iterator(config, global_batch_size=8,
                                         process_count=3, process_index=0)
  with pytest.raises(ValueError, match='Unknown eval mode'):
    input_pipeline.create_eval_iterator(config, scale=32, mode='dense')
  with pytest.raises(ValueError, match='Test scale 16 is smaller than the '
                     'crop'):
    input_pipeline.create_eval_iterator(config, scale=16, mode='center_crop')
  config = _config(ramp_root, data_dir)
  config.data.cache_decoded_mb = -1.0
  with pytest.raises(ValueError, match='data.cache_decoded_mb must be >= 0'):
    input_pipeline.create_train_iterator(config)
  config = _config(ramp_root, data_dir, interpolation='cubic-ish')
  with pytest.raises(ValueError, match='Unknown input.interpolation'):
    input_pipeline.create_train_iterator(config)


def test_class_subset_of_an_image_folder(ids_root, data_dir):
  """Classes by folder name; each image's value names its class."""
  config = _config(ids_root, data_dir, scale_min=8, scale_max=8, crop_size=8)
  config.data.classes = ('c05', 'c01', 'c30')
  info = input_pipeline.get_dataset_info(config)
  assert info.class_names == ('c05', 'c01', 'c30')
  assert info.num_examples == {'train': 3, 'validation': 2}  # no c30 there
  values = np.array([5, 1, 30])
  batches = _batches(input_pipeline.create_train_iterator(
      config, global_batch_size=3), 4)
  for batch in batches:
    assert sorted(batch['label']) == [0, 1, 2]  # one epoch per batch
    for image, label in zip(batch['image'], batch['label']):
      assert (image == values[label]).all()
  batches = list(input_pipeline.create_eval_iterator(
      config, scale=8, mode='center_crop', global_batch_size=4))
  assert len(batches) == 1
  batch = batches[0]
  np.testing.assert_array_equal(batch['mask'], [True, True, False, False])
  for image, label in zip(batch['image'][:2], batch['label'][:2]):
    assert (image == values[label]).all()
  assert sorted(batch['label'][:2]) == [0, 1]
