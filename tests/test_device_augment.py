"""Rescale-crop-flip on the device equals the host's PIL path; in-memory batches."""

import functools

import jax
import numpy as np
import pytest
from conftest import restore_iterator_state
from conftest import train_straight_and_split
from PIL import Image

from vgg_jax import decoding
from vgg_jax import device_augment
from vgg_jax import in_memory
from vgg_jax import input_pipeline
from vgg_jax import preprocessing
from vgg_jax import steps
from vgg_jax import train
from vgg_jax import weights
from vgg_jax.datasets import testing


def _augmentation(**overrides):
  fields = dict(seed=5, scale_min=32, scale_max=48, crop_size=32,
                random_flip=True, pca_sigma=0.1)
  fields.update(overrides)
  return device_augment.Augmentation(**fields)


def _draws(augmentation, records, image_hw, epoch=0):
  draw = functools.partial(augmentation.draws, image_hw=image_hw)
  return jax.tree.map(np.asarray, jax.jit(jax.vmap(draw))(
      np.asarray(records, np.int32), np.full(len(records), epoch, np.int32)))


def _host_crop(image, size, offset, flip, shift, crop):
  """The host path's ops (`input_pipeline._TrainExample._augment`)."""
  out = preprocessing.crop_rescaled(
      Image.fromarray(image), scale=int(min(size)),
      box=(int(offset[1]), int(offset[0]), crop, crop))
  if flip:
    out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(preprocessing.apply_color_shift(out, shift))


@pytest.mark.parametrize('shape', [(28, 28, 3), (30, 41, 3), (64, 60, 3)])
def test_device_crops_equal_pil_to_one_level(shape):
  rng = np.random.default_rng(0)
  images = np.stack([testing.ramp_image(shape[1], shape[0]) // 2 +
                     rng.integers(0, 128, shape, dtype=np.uint8)
                     for _ in range(12)])
  # 64x60 shrinks to S in [32, 48]: antialiased, as PIL's resize.
  draws = _draws(_augmentation(), range(12), shape[:2])
  got = np.asarray(jax.jit(device_augment.crops, static_argnums=1)(
      {'image': images, **draws}, 32)).astype(int)
  want = np.stack([
      _host_crop(image, *(draws[k][i] for k in ('size', 'offset', 'flip',
                                                'shift')), 32)
      for i, image in enumerate(images)]).astype(int)
  assert got.shape == (12, 32, 32, 3)
  # PIL rounds in fixed point between its two passes: some pixels differ
  # by one level, in both directions.
  np.testing.assert_array_less(np.abs(got - want), 2)
  assert np.mean(got != want) < 0.3 and abs(np.mean(got - want)) < 0.05
  # The whole augmentation, as the train step calls it, is these crops.
  batch = {'image': images, 'record': np.arange(12, dtype=np.int32),
           'epoch': np.zeros(12, np.int32)}
  np.testing.assert_array_equal(jax.jit(_augmentation())(batch), got)


def test_draws_cover_the_augmentation_and_stay_inside_the_image():
  draws = _draws(_augmentation(), range(4000), (30, 40))
  size, offset = draws['size'], draws['offset']
  np.testing.assert_array_equal(size.min(axis=1), size[:, 0])  # H smaller
  assert set(size[:, 0]) == set(range(32, 49))  # every S in [32, 48]
  np.testing.assert_array_equal(
      size, [preprocessing.rescaled_size((40, 30), s)[::-1]
             for s in size[:, 0]])
  assert (offset >= 0).all() and (offset + 32 <= size).all()
  assert (offset[:, 1] == size[:, 1] - 32).any() and (offset == 0).any()
  assert 0.45 < draws['flip'].mean() < 0.55
  shift = draws['shift']
  np.testing.assert_array_equal(shift, np.rint(shift))
  assert shift.std() > 1
  plain = _draws(_augmentation(random_flip=False, pca_sigma=0.0), range(50),
                 (30, 40))
  assert not plain['flip'].any() and not plain['shift'].any()


def test_draws_follow_the_record_and_epoch_alone():
  first = _draws(_augmentation(), [3, 9, 4], (28, 28))
  again = _draws(_augmentation(), [4, 3], (28, 28))
  for key in first:
    np.testing.assert_array_equal(first[key][[2, 0]], again[key])
  later = _draws(_augmentation(), [3, 9, 4], (28, 28), epoch=1)
  other_seed = _draws(_augmentation(seed=6), [3, 9, 4], (28, 28))
  for draws in (later, other_seed):
    assert any(not np.array_equal(first[k], draws[k]) for k in first)


def _config(tiny_config, **data):
  config = tiny_config
  config.input.augment_on_device = True
  config.data.update(data)
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_batches_hold_the_shard_in_the_host_paths_epoch_order(tiny_config):
  config = _config(tiny_config)
  batches = _take(input_pipeline.create_train_iterator(config), 12)
  spec = steps.train_batch_spec(config, (28, 28, 3))
  for key, value in batches[0].items():
    assert value.shape == spec[key].shape and value.dtype == spec[key].dtype
  config.input.augment_on_device = False
  host = _take(input_pipeline.create_train_iterator(config), 12)
  labels = np.concatenate([b['label'] for b in batches])
  np.testing.assert_array_equal(
      labels, np.concatenate([b['label'] for b in host]))
  # 160 records, batches of 16: epochs of 10 batches, all records once each.
  images = np.concatenate([b['image'] for b in batches[:10]])
  assert len(np.unique(images.reshape(160, -1), axis=0)) == 160


def test_a_restored_iterator_continues_the_stream(tiny_config, tmp_path):
  config = _config(tiny_config)
  iterator = input_pipeline.create_train_iterator(config)
  _take(iterator, 9)
  restored = input_pipeline.create_train_iterator(config)
  restore_iterator_state(iterator, restored, tmp_path / 'ckpt')
  want = _take(iterator, 3)  # crosses into the second epoch
  for a, b in zip(want, _take(restored, 3)):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_clear_errors_for_what_the_device_path_cannot_do(tiny_config):
  config = _config(tiny_config, cache_decoded_mb=0.1)
  with pytest.raises(ValueError, match=r'160 images of \(28, 28, 3\) take 0 '
                     r'MiB, more than data.cache_decoded_mb=0.1'):
    input_pipeline.create_train_iterator(config)
  config = _config(tiny_config)
  config.input.interpolation = 'bicubic'
  with pytest.raises(ValueError, match="bilinearly only; got "
                     "input.interpolation='bicubic'"):
    input_pipeline.create_train_iterator(config)


def test_unreadable_images_and_images_of_another_size_are_named():
  files = {7: testing.encode(np.zeros((8, 8, 3), np.uint8)),
           9: testing.encode(np.zeros((8, 9, 3), np.uint8)),
           11: b'not an image'}
  shard = in_memory.InMemoryShard(
      lambda key: (files[key], np.int32(0)), [7, 9, 11], 1.0, 10 ** 6)
  with pytest.raises(ValueError, match=r'record 9 is \(8, 9, 3\), the first '
                     r'\(8, 8, 3\)'):
    shard.gather(np.array([1]))
  with pytest.raises(decoding.ImageDecodeError,
                     match=r'training record 11: .*skips bad records'):
    shard.gather(np.array([0, 2]))


def test_training_on_device_crops_learns(tiny_config, tmp_path):
  config = _config(tiny_config)
  config.train.max_steps = 30
  config.train.log_every_steps = 10
  summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  losses = [loss for _, loss in summary['train_loss_history']]
  assert losses[-1] < losses[0]


def test_a_resumed_run_equals_a_straight_one(tiny_config, tmp_path):
  # 12 steps of 16 cross the 160-record epoch; the split run resumes at 5.
  summary = train_straight_and_split(_config(tiny_config), tmp_path, 12, 5)
  assert summary['step'] == 12
  straight, split = (weights.load_variables(str(tmp_path / run))[0]
                     for run in ('straight', 'split'))
  jax.tree.map(np.testing.assert_array_equal, straight, split)
