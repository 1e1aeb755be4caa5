"""vgg_jax.pretrained: weights-only directories with their input metadata."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vgg_jax import pretrained
from vgg_jax import trees

TINY = dict(width_multiplier=1 / 16, num_classes=10, fc6_kernel=1)


def _tiny_state(name='vgg11_bn', seed=0):
  """Random weights (positive BN variances) as a nested dict, no model."""
  rng = np.random.default_rng(seed)
  flat = {}
  for k, (shape, _) in pretrained.expected_shapes(name, **TINY).items():
    value = rng.standard_normal(shape).astype(np.float32)
    flat[k] = np.abs(value) + 0.5 if k[-1] == 'var' else value
  return trees.unflatten(flat)


def _assert_weights_equal(model, state):
  got = trees.flatten(nnx.to_pure_dict(
      nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))))
  want = trees.flatten(state)
  assert set(got) == set(want)
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v, err_msg=str(k))


def _images(n=2, size=32):
  return jax.random.normal(jax.random.key(1), (n, size, size, 3))


def _save(tmp_path, model, name='vgg11_bn', **meta_kwargs):
  meta = pretrained.make_metadata(name, normalization='mean_rgb', **TINY,
                                  **meta_kwargs)
  return pretrained.save_pretrained(tmp_path / 'pt', model, meta)


def test_save_then_load_gives_the_same_weights(tmp_path):
  state = _tiny_state()
  names = [f'c{i}' for i in range(10)]
  path = _save(tmp_path, state, class_names=names)
  assert pretrained.is_pretrained_dir(path)
  loaded, meta = pretrained.load_pretrained(path)
  _assert_weights_equal(loaded, state)
  assert meta['class_names'] == names
  assert meta['normalization'] == 'mean_rgb'
  assert meta['mean_rgb'] == [123.68, 116.779, 103.939]
  assert meta['channel_order'] == 'RGB'
  assert meta['model'] == {'name': 'vgg11_bn', 'num_classes': 10,
                           'dropout_rate': 0.5, 'width_multiplier': 1 / 16,
                           'fc6_kernel': 1, 'init': 'normal',
                           'dtype': 'float32', 'param_dtype': 'float32',
                           'in_channels': 3}
  on_disk = json.loads((path / 'metadata.json').read_text())
  assert on_disk['format'] == 'vgg_jax.pretrained/1'
  assert sorted(os.listdir(tmp_path)) == ['pt']  # no temporary left
  x = _images()
  assert np.array_equal(loaded(x), loaded(x))  # eval mode: no dropout
  stored, _ = pretrained.load_state_dict(path)
  kernel = stored['blocks'][2]['convs'][1]['kernel']
  assert isinstance(kernel, np.ndarray)  # host arrays, int list indices
  np.testing.assert_array_equal(kernel,
                                state['blocks'][2]['convs'][1]['kernel'])


def test_a_loaded_model_saves_back_and_seeds_dropout(tmp_path):
  state = _tiny_state()
  loaded, _ = pretrained.load_pretrained(_save(tmp_path, state), rngs=3)
  again = pretrained.save_pretrained(
      tmp_path / 'again', loaded,
      pretrained.make_metadata('vgg11_bn', normalization='mean_rgb', **TINY))
  _assert_weights_equal(pretrained.load_pretrained(again)[0], state)
  # rngs seeds the dropout stream: same seed, same masks; another, others.
  x = _images()
  outputs = []
  for seed in (3, 3, 4):
    model, _ = pretrained.load_pretrained(again, rngs=seed)
    model.train()
    outputs.append(np.asarray(model(x)))
  np.testing.assert_array_equal(outputs[0], outputs[1])
  assert not np.array_equal(outputs[0], outputs[2])


def test_overrides(tmp_path):
  path = _save(tmp_path, _tiny_state())
  model, meta = pretrained.load_pretrained(path, param_dtype='bfloat16',
                                           dtype='bfloat16', dropout_rate=0.1)
  assert model.fc8.kernel[...].dtype == jnp.bfloat16
  assert meta['model']['param_dtype'] == 'bfloat16'
  assert meta['model']['dropout_rate'] == 0.1
  with pytest.raises(ValueError, match='wrong shape: fc8.kernel'):
    pretrained.load_pretrained(path, num_classes=5)
  with pytest.raises(ValueError, match='name .*cannot be overridden'):
    pretrained.load_pretrained(path, name='vgg13')
  with pytest.raises(ValueError, match='Unknown model option'):
    pretrained.load_pretrained(path, colour='blue')


def test_trunk_only_dir_gets_a_random_head(tmp_path):
  state = _tiny_state()
  trunk = {'blocks': state['blocks']}
  meta = pretrained.make_metadata('vgg11_bn', normalization='caffe_bgr',
                                  include_top=False, **TINY)
  with pytest.raises(ValueError, match='unexpected: fc6.kernel'):
    pretrained.save_pretrained(tmp_path / 'bad', state, meta)
  assert not (tmp_path / 'bad').exists()
  path = pretrained.save_pretrained(tmp_path / 'trunk', trunk, meta)
  stored, meta = pretrained.load_state_dict(path)
  assert set(stored) == {'blocks'} and meta['include_top'] is False
  # Head options are free: the head is not stored.
  loaded, meta = pretrained.load_pretrained(path, num_classes=3, fc6_kernel=2,
                                            init='he')
  assert loaded.fc8.kernel.shape == (1, 1, 256, 3)
  assert meta['model']['num_classes'] == 3
  assert float(jnp.abs(loaded.fc6.kernel[...]).max()) > 0  # random, not zeros
  assert float(jnp.abs(loaded.fc6.bias[...]).max()) == 0
  np.testing.assert_array_equal(loaded.blocks[4].norms[1].var[...],
                                state['blocks'][4]['norms'][1]['var'])


def test_not_a_pretrained_dir(tmp_path):
  assert not pretrained.is_pretrained_dir(tmp_path)
  assert not pretrained.is_pretrained_dir(tmp_path / 'nope')
  (tmp_path / 'state').mkdir()
  (tmp_path / 'metadata.json').write_text('{"format": "other/9"}')
  assert not pretrained.is_pretrained_dir(tmp_path)
  with pytest.raises(ValueError, match='format'):
    pretrained.load_pretrained(tmp_path)
  with pytest.raises(ValueError, match='not a pretrained dir.*vgg_jax.convert'):
    pretrained.load_state_dict(tmp_path / 'nope')


def test_save_refuses_weights_that_do_not_fit(tmp_path):
  model = _tiny_state()
  meta = pretrained.make_metadata('vgg13_bn', normalization='mean_rgb', **TINY)
  with pytest.raises(ValueError, match='missing: blocks.0.convs.1.kernel'):
    pretrained.save_pretrained(tmp_path / 'pt', model, meta)
  assert os.listdir(tmp_path) == []
  path = _save(tmp_path, model)
  with pytest.raises(FileExistsError, match='exists.*--overwrite'):
    _save(tmp_path, model)
  assert pretrained.is_pretrained_dir(path)


def test_overwrite_replaces_the_whole_dir_or_nothing(tmp_path, monkeypatch):
  meta = pretrained.make_metadata('vgg11_bn', normalization='mean_rgb', **TINY)
  path = pretrained.save_pretrained(tmp_path / 'pt', _tiny_state(seed=1), meta)
  (path / 'stray.txt').write_text('from the old dir')
  new = _tiny_state(seed=2)

  def fail(*args, **kwargs):
    raise OSError('disk full')
  with monkeypatch.context() as m:
    m.setattr(pretrained.ocp.StandardCheckpointer, 'save', fail)
    with pytest.raises(OSError, match='disk full'):
      pretrained.save_pretrained(path, new, meta, overwrite=True)
  assert (path / 'stray.txt').exists()  # the old dir, untouched
  assert sorted(os.listdir(tmp_path)) == ['pt']
  pretrained.save_pretrained(path, new, meta, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ['pt']
  assert not (path / 'stray.txt').exists()
  stored, _ = pretrained.load_state_dict(path)
  np.testing.assert_array_equal(stored['fc8']['kernel'],
                                new['fc8']['kernel'])


def test_save_accepts_a_flat_dict_with_digit_string_indices(tmp_path):
  state = _tiny_state()
  flat = {tuple(str(k) for k in path): v
          for path, v in trees.flatten(state).items()}
  meta = pretrained.make_metadata('vgg11_bn', normalization='mean_rgb', **TINY)
  path = pretrained.save_pretrained(tmp_path / 'pt', flat, meta)
  stored, _ = pretrained.load_state_dict(path)
  np.testing.assert_array_equal(stored['blocks'][1]['norms'][0]['mean'],
                                state['blocks'][1]['norms'][0]['mean'])


def test_make_metadata_checks_its_input():
  with pytest.raises(ValueError, match='Unknown normalization'):
    pretrained.make_metadata('vgg16', normalization='bgr')
  with pytest.raises(ValueError, match='only used with normalization'):
    pretrained.make_metadata('vgg16', normalization='imagenet_mean_std',
                             mean_rgb=(1, 2, 3))
  with pytest.raises(ValueError, match='2 class names for 1000 classes'):
    pretrained.make_metadata('vgg16', normalization='caffe_bgr',
                             class_names=['a', 'b'])
  with pytest.raises(ValueError, match='Unknown model name'):
    pretrained.make_metadata('vgg17', normalization='caffe_bgr')
  meta = pretrained.make_metadata('vgg16', normalization='caffe_bgr')
  assert meta['channel_order'] == 'BGR' and meta['mean_rgb'] is None


def test_relative_paths(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  state = _tiny_state()
  meta = pretrained.make_metadata('vgg11_bn', normalization='mean_rgb', **TINY)
  pretrained.save_pretrained('rel/pt', state, meta)
  assert pretrained.is_pretrained_dir('rel/pt')
  stored, _ = pretrained.load_state_dict('rel/pt')
  np.testing.assert_array_equal(stored['fc7']['kernel'],
                                state['fc7']['kernel'])
