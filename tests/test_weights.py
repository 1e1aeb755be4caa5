"""Weights: loading models and variables, init_from's layer copying."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vgg_jax import checkpointing
from vgg_jax import models
from vgg_jax import pretrained
from vgg_jax import weights


def _model(config, name=None):
  return models.create_model(
      name or config.model.name,
      **models.ModelOptions.from_config(config.model).as_dict())


def _abstract_model(config):
  return models.abstract_model(
      config.model.name,
      **models.ModelOptions.from_config(config.model).as_dict())


def test_load_variables_of_a_workdir_has_int_indices_and_step(net_a_run):
  params, stats, meta = weights.load_variables(str(net_a_run))
  assert meta['step'] == 2 and meta['model']['name'] == 'vgg11'
  assert sorted(params['blocks']) == [0, 1, 2, 3, 4]  # ints, not '0'
  assert sorted(params['blocks'][2]['convs']) == [0, 1]
  assert params['fc8']['kernel'].shape[-1] == 10
  assert not stats  # plain net A: no BN statistics
  _, _, best = weights.load_variables(str(net_a_run), 'best')
  assert best['step'] == 2
  with pytest.raises(FileNotFoundError, match='No checkpoint at step 7'):
    weights.load_variables(str(net_a_run), 7)


def test_load_model_from_a_workdir_holds_the_checkpoint(net_a_run):
  model, config, meta = weights.load_model(str(net_a_run))
  assert config.model.name == 'vgg11' and meta['step'] == 2
  assert meta['normalization'] == config.input.normalization
  params, _, _ = weights.load_variables(str(net_a_run))
  got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  np.testing.assert_array_equal(got['fc6']['kernel'], params['fc6']['kernel'])
  np.testing.assert_array_equal(got['blocks'][4]['convs'][1]['bias'],
                                params['blocks'][4]['convs'][1]['bias'])
  x = jnp.zeros((2, 32, 32, 3))
  np.testing.assert_array_equal(model(x), model(x))  # eval mode: no dropout


def test_load_model_refuses_a_checkpoint_of_another_model(net_a_copy):
  config = checkpointing.read_config(str(net_a_copy))
  config.model.num_classes = 12
  checkpointing.write_config(str(net_a_copy), config)
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match='num_classes: checkpoint 10 vs config 12'):
    weights.load_model(str(net_a_copy))


def test_load_model_and_variables_from_a_pretrained_dir(tiny_config,
                                                        tmp_path):
  tiny_config.model.name = 'vgg11_bn'
  model = _model(tiny_config)
  meta = pretrained.make_metadata(
      'vgg11_bn', normalization='imagenet_mean_std',
      class_names=[str(i) for i in range(10)],
      **models.ModelOptions.from_config(tiny_config.model).as_dict())
  pretrained.save_pretrained(tmp_path / 'pre', model, meta)
  params, stats, meta = weights.load_variables(str(tmp_path / 'pre'))
  assert set(stats['blocks'][0]['norms'][0]) == {'mean', 'var'}
  assert set(params['blocks'][0]['norms'][0]) == {'scale', 'bias'}
  loaded, config, meta = weights.load_model(str(tmp_path / 'pre'))
  assert meta['step'] == 0 and config.model.name == 'vgg11_bn'
  assert config.input.normalization == 'imagenet_mean_std'
  assert config.model.width_multiplier == tiny_config.model.width_multiplier
  x = jnp.asarray(np.random.RandomState(0).rand(2, 32, 32, 3), jnp.float32)
  model.eval()
  np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6, atol=1e-6)


def test_split_pure_puts_running_statistics_apart():
  params, stats = weights._split_pure({  # pylint: disable=protected-access
      'blocks': {'0': {'norms': {'0': {'scale': 1, 'bias': 2, 'mean': 3,
                                       'var': 4}}}},
      'fc8': {'kernel': 5}})
  assert params == {'blocks': {0: {'norms': {0: {'scale': 1, 'bias': 2}}}},
                    'fc8': {'kernel': 5}}
  assert stats == {'blocks': {0: {'norms': {0: {'mean': 3, 'var': 4}}}}}


def test_merge_into_names_unexpected_and_misshapen_variables():
  target = {('fc8', 'kernel'): np.zeros((4, 10))}
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match='unexpected variable fc9/kernel'):
    weights._merge_into(  # pylint: disable=protected-access
        target, {('fc9', 'kernel'): np.zeros((4, 10))}, 'here')
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r'fc8/kernel has shape \(4, 12\), the model wants '
                           r'\(4, 10\)'):
    weights._merge_into(  # pylint: disable=protected-access
        target, {('fc8', 'kernel'): np.zeros((4, 12))}, 'here')


def test_init_from_net_a_copies_exactly_the_stated_layers(tiny_config,
                                                          net_a_run):
  src, _, _ = weights.load_variables(str(net_a_run))
  tiny_config.model.name = 'vgg16'
  tiny_config.train.init_from = str(net_a_run)
  model = _model(tiny_config)
  fresh = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  copied = weights.init_from(model, tiny_config)
  assert copied == ['blocks.0.convs.0', 'blocks.1.convs.0', 'blocks.2.convs.0',
                    'blocks.2.convs.1', 'fc6', 'fc7', 'fc8']
  got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  same = {(0, 0), (1, 0), (2, 0), (2, 1)}
  for b, block in got['blocks'].items():
    for i, conv in block['convs'].items():
      want = (src if (b, i) in same else fresh)['blocks'][b]['convs'][i]
      np.testing.assert_array_equal(conv['kernel'], want['kernel'])
      np.testing.assert_array_equal(conv['bias'], want['bias'])
  for fc in ('fc6', 'fc7', 'fc8'):
    np.testing.assert_array_equal(got[fc]['kernel'], src[fc]['kernel'])


def test_init_from_the_same_net_copies_every_layer(tiny_config, net_a_run):
  src, _, _ = weights.load_variables(str(net_a_run))
  tiny_config.train.init_from = str(net_a_run)
  model = _model(tiny_config)
  copied = weights.init_from(model, tiny_config)
  assert len(copied) == 8 + 3  # net A: 8 conv layers, 3 FC layers
  got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  np.testing.assert_array_equal(got['blocks'][4]['convs'][1]['kernel'],
                                src['blocks'][4]['convs'][1]['kernel'])


def test_init_from_shape_mismatch_is_a_clear_error(tiny_config, net_a_run):
  tiny_config.model.name = 'vgg13'
  tiny_config.model.width_multiplier = 1 / 8
  tiny_config.train.init_from = str(net_a_run)
  # Both fail before copying anything: shapes are enough.
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r'blocks.0.convs.0.(kernel|bias) has shape'):
    weights.init_from(_abstract_model(tiny_config), tiny_config)
  tiny_config.model.name = 'vgg13_bn'
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match='holds vgg11'):
    weights.init_from(_abstract_model(tiny_config), tiny_config)


def test_init_from_net_a_into_the_5x5_net_is_refused(tiny_config, net_a_run):
  tiny_config.model.name = 'vgg13_5x5'
  tiny_config.train.init_from = str(net_a_run)
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"3x3 convs do not fit vgg13_5x5's 5x5 convs.*"
                           'model.init=glorot'):
    weights.init_from(_abstract_model(tiny_config), tiny_config)

