"""Named layers: the names, their table, and ``model.features(x, layers)``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import accelerator_convs
from vgg_jax import layers
from vgg_jax import layouts
from vgg_jax import models

# torchvision's ``cfgs`` (torchvision/models/vgg.py), transcribed: ints are
# 3x3 convs, 'M' a max-pool; make_layers adds [BN,] ReLU after each conv.
TORCHVISION_CFGS = {
    'vgg11': [64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'],
    'vgg13': [64, 64, 'M', 128, 128, 'M', 256, 256, 'M', 512, 512, 'M', 512,
              512, 'M'],
    'vgg16': [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512,
              'M', 512, 512, 512, 'M'],
    'vgg19': [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M', 512, 512,
              512, 512, 'M', 512, 512, 512, 512, 'M'],
}


def tiny(name='vgg16', **kw):
  opts = dict(width_multiplier=1 / 16, num_classes=5, fc6_kernel=1, init='he')
  opts.update(kw)
  model = models.create_model(name, **opts)
  model.eval()
  return model


def randomize_batch_norm(model, seed=0):
  """Non-trivial BN statistics and affine terms (at init BN is identity)."""
  rng = np.random.RandomState(seed)
  for block in model.blocks:
    for norm in block.norms or ():
      c = norm.mean.shape[0]
      norm.mean[...] = jnp.asarray(rng.randn(c), jnp.float32)
      norm.var[...] = jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32)
      norm.scale[...] = jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32)
      norm.bias[...] = jnp.asarray(rng.randn(c), jnp.float32)
  return model


@pytest.fixture(scope='module')
def vgg11_lrn_bn():
  return randomize_batch_norm(tiny('vgg11_lrn_bn'))


def torchvision_modules(name):
  """``features.N`` -> 'conv'/'bn'/'relu'/'pool', as make_layers builds."""
  base, bn = name.removesuffix('_bn'), name.endswith('_bn')
  kinds = []
  for v in TORCHVISION_CFGS[base]:
    kinds += ['pool'] if v == 'M' else ['conv'] + ['bn'] * bn + ['relu']
  return kinds


def test_names_of_net_d_and_its_variants():
  names = layers.layer_names('vgg16')
  assert names[:7] == ['conv1_1', 'relu1_1', 'conv1_2', 'relu1_2', 'pool1',
                       'conv2_1', 'relu2_1']
  assert names[-7:] == ['relu5_3', 'pool5', 'fc6', 'relu6', 'fc7', 'relu7',
                        'fc8']
  assert len(names) == 13 * 2 + 5 + 5
  assert layers.layer_names('vgg16_bn')[:4] == ['conv1_1', 'bn1_1', 'relu1_1',
                                                'conv1_2']
  assert layers.layer_names('vgg11_lrn')[:4] == ['conv1_1', 'relu1_1', 'lrn1',
                                                 'pool1']
  # B-5x5: one conv per block.
  assert [n for n in layers.layer_names('vgg13_5x5')
          if n.startswith('conv')] == [f'conv{b}_1' for b in range(1, 6)]
  assert 'conv5_4' in layers.layer_names('vgg19')
  assert models.layer_names is layers.layer_names


@pytest.mark.parametrize('name', models.MODEL_NAMES)
def test_every_net_yields_its_names_in_order(name):
  # Shapes only: the traced forward's layer order is the table's.
  seen = []

  def forward(model, x):
    out = {}
    steps = model._activations(x, None, None)  # pylint: disable=protected-access
    for layer, value in steps:
      seen.append(layer)
      out[layer] = value
    return out

  shapes = nnx.eval_shape(forward, models.abstract_model(name),
                          jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  assert seen == layers.layer_names(name)
  widths = {row['layer']: row['op'] for row in layers.layer_table(name)}
  for row in layers.layer_table(name):
    shape = shapes[row['layer']].shape
    head = row['layer'] in layers.HEAD_ACTIVATIONS
    side = 1 if head else 224 // row['stride']
    assert shape[1:3] == (side, side), row
    if row['op'].startswith(('conv', 'FC')):
      assert shape[3] == int(widths[row['layer']].split('-')[1]), row


@pytest.mark.parametrize('name', layers.TORCHVISION_MODELS)
def test_torchvision_indices_match_make_layers(name):
  kinds = torchvision_modules(name)
  rows = [r for r in layers.layer_table(name) if r['layer'] != 'lrn1']
  trunk = [r for r in rows if r['torchvision'].startswith('features.')]
  assert [int(r['torchvision'].split('.')[1]) for r in trunk] == list(
      range(len(kinds)))
  for row, kind in zip(trunk, kinds):
    assert row['layer'].startswith(kind), (row, kind)
  head = {r['layer']: r['torchvision'] for r in rows
          if r['layer'] in layers.HEAD_ACTIVATIONS}
  # classifier: Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear.
  assert head == {'fc6': 'classifier.0', 'relu6': 'classifier.1',
                  'fc7': 'classifier.3', 'relu7': 'classifier.4',
                  'fc8': 'classifier.6'}
  # The converter reads each conv's weights from the same features.N.
  conv_keys = [e.key.rsplit('.', 1)[0] for e in
               layouts.source_layout('torchvision', name, include_top=False)
               if e.path and e.path[2] == 'convs' and e.path[-1] == 'kernel']
  assert conv_keys == [r['torchvision'] for r in trunk
                       if r['layer'].startswith('conv')]


@pytest.mark.parametrize('name', ['vgg16', 'vgg19'])
def test_keras_names(name):
  table = {r['layer']: r['keras'] for r in layers.layer_table(name)}
  # Keras convs include the ReLU: block{b}_conv{i} is relu{b}_{i}.
  assert table['relu1_1'] == 'block1_conv1' and table['conv1_1'] is None
  assert table['pool3'] == 'block3_pool'
  assert (table['relu6'], table['relu7'], table['fc8']) == ('fc1', 'fc2',
                                                            'predictions')
  assert table['fc6'] is None and table['fc7'] is None
  keras_convs = [e.key.split('/')[0] for e in
                 layouts.source_layout('keras', name, include_top=False)
                 if e.path[-1] == 'kernel']
  assert keras_convs == [table[n] for n in layers.layer_names(name)
                         if n.startswith('relu') and
                         n not in layers.HEAD_ACTIVATIONS]
  assert set(layers.KERAS_MODELS) == set(layouts.SUPPORTED_MODELS['keras'])
  assert set(layers.TORCHVISION_MODELS) == set(
      layouts.SUPPORTED_MODELS['torchvision'])


def test_nets_without_a_published_layout_have_no_foreign_names():
  for name in ('vgg11_lrn', 'vgg16_c', 'vgg13_5x5_bn', 'vgg11'):
    rows = layers.layer_table(name)
    assert all(r['keras'] is None for r in rows)
    assert all(r['torchvision'] is None for r in rows) == (
        name not in layers.TORCHVISION_MODELS)


def test_markdown_table():
  md = layers.layer_table_markdown('vgg16')
  lines = md.splitlines()
  assert lines[0] == '| Layer | Op | Stride | torchvision | Keras |'
  assert '| `relu1_1` | ReLU | 1 | `features.1` | `block1_conv1` |' in lines
  assert '| `conv1_1` | conv3-64 | 1 | `features.0` | - |' in lines
  assert '| `pool5` | maxpool | 32 | `features.30` | `block5_pool` |' in lines
  assert sum(line.startswith('| `') for line in lines) == len(
      layers.layer_names('vgg16'))


def test_named_layers_agree_with_the_summary_and_each_other(vgg11_lrn_bn):
  model = vgg11_lrn_bn
  x = jax.random.normal(jax.random.key(0), (2, 64, 32, 3))
  names = layers.layer_names(model.name)
  got = model.features(x, names[::-1])  # any order; returned as requested
  assert list(got) == names[::-1]
  summary = model.features(x)
  assert set(summary) == {'pool1', 'pool2', 'pool3', 'pool4', 'pool5',
                          'relu6', 'relu7', 'scores'}
  for name in ('pool1', 'pool2', 'pool3', 'pool4', 'pool5', 'relu6', 'relu7'):
    np.testing.assert_array_equal(got[name], summary[name])
  np.testing.assert_array_equal(got['fc8'], summary['scores'])
  np.testing.assert_allclose(got['fc6'], model.fc6(got['pool5']), rtol=1e-6)
  np.testing.assert_array_equal(got['relu6'], jnp.maximum(got['fc6'], 0))
  np.testing.assert_array_equal(got['conv1_1'], model.blocks[0].convs[0](x))
  np.testing.assert_array_equal(got['relu1_1'], jnp.maximum(got['bn1_1'], 0))
  np.testing.assert_allclose(got['bn2_1'], model.blocks[1].norms[0](
      got['conv2_1']), rtol=1e-6)
  assert not np.allclose(got['conv2_1'], got['bn2_1'])
  np.testing.assert_allclose(
      got['lrn1'], models.local_response_norm(got['relu1_1']), rtol=1e-6)
  # One name as a string; exactly what was asked for.
  assert list(model.features(x, 'relu3_2')) == ['relu3_2']


def count_convs(fn, x):
  return accelerator_convs(fn, x)


def test_only_runs_up_to_the_deepest_requested_layer(vgg11_lrn_bn):
  model = vgg11_lrn_bn  # convs per block: 1, 1, 2, 2, 2
  x = jnp.zeros((1, 32, 32, 3))
  for wanted, convs in ((['conv1_1'], 1), (['lrn1'], 1), (['pool1'], 1),
                        (['relu2_1'], 2), (['relu1_1', 'bn3_2'], 4),
                        (['pool5'], 8), (['fc6'], 9), (['relu6', 'fc8'], 11)):
    assert count_convs(lambda v, w=wanted: model.features(v, w), x) == convs
  assert count_convs(model.features, x) == 11  # the summary runs everything
  assert count_convs(lambda v: model.features(v, []), x) == 0
  assert not model.features(x, [])


def test_trunk_layers_need_no_room_for_fc6(vgg11_lrn_bn):
  x = jnp.ones((1, 24, 40, 3))  # FC-6 (1x1 over the 1/32 map) needs 32x32
  assert vgg11_lrn_bn.features(x, ['relu4_2'])['relu4_2'].shape == (1, 3, 5,
                                                                    32)
  with pytest.raises(ValueError, match='at least 32x32'):
    vgg11_lrn_bn.features(x, ['relu3_1', 'relu7'])


def test_unknown_layer_lists_the_valid_ones(vgg11_lrn_bn):
  x = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(ValueError, match=r"vgg11_lrn_bn has no layer\(s\) "
                     r"'relu3_3'.*valid layers of vgg11_lrn_bn: conv1_1, "
                     r"bn1_1, relu1_1, lrn1, pool1,.*relu3_2,.*fc8"):
    vgg11_lrn_bn.features(x, ['relu1_1', 'relu3_3'])
  with pytest.raises(ValueError, match="'block1'"):
    vgg11_lrn_bn.features(x, ['block1'])


def test_named_layers_on_the_masked_canvas(vgg11_lrn_bn):
  model = vgg11_lrn_bn
  rng = np.random.RandomState(0)
  sizes = [(70, 45), (33, 64)]  # odd sizes exercise the pool borders
  canvas = np.zeros((2, 96, 96, 3), np.float32)
  names = ['conv1_1', 'bn1_1', 'lrn1', 'pool1', 'conv3_2', 'relu3_2', 'pool3',
           'pool5', 'fc6', 'relu7', 'fc8']
  rows = {r['layer']: r for r in layers.layer_table(model.name)}
  for i, (h, w) in enumerate(sizes):
    img = rng.randn(1, h, w, 3).astype(np.float32)
    canvas[i, :h, :w] = img
  got = model.features(jnp.asarray(canvas), names,
                       valid_size=jnp.array(sizes))
  for i, (h, w) in enumerate(sizes):
    alone = model.features(jnp.asarray(canvas[i:i + 1, :h, :w]), names)
    for name in names:
      a = np.asarray(alone[name][0])
      inside = np.zeros(got[name].shape[1:3], bool)
      inside[:a.shape[0], :a.shape[1]] = True
      if name not in layers.HEAD_ACTIVATIONS:
        assert a.shape[:2] == (h // rows[name]['stride'],
                               w // rows[name]['stride'])
      # Round-off differs between the canvas and the image alone (other
      # shapes, other summation orders): tolerances scale with the layer.
      np.testing.assert_allclose(got[name][i][inside].reshape(a.shape), a,
                                 rtol=1e-4, atol=1e-5 * max(1, np.abs(a).max()),
                                 err_msg=name)
      assert not np.any(np.asarray(got[name][i])[~inside]), name


def test_named_layers_are_differentiable_in_the_input(vgg11_lrn_bn):
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))

  def total(v, layer, valid_size=None):
    return vgg11_lrn_bn.features(v, [layer], valid_size=valid_size)[
        layer].sum()

  for layer in ('relu3_2', 'conv1_1', 'fc7'):
    g = jax.grad(total)(x, layer)
    assert g.shape == x.shape and np.isfinite(g).all() and np.abs(g).max() > 0
  g = jax.grad(total)(x, 'pool4', jnp.array([[32, 16], [20, 32]]))
  assert np.isfinite(g).all() and np.abs(g[0, :, :16]).max() > 0
  # Nothing outside the image reaches the output.
  assert not np.any(g[0, :, 16:]) and not np.any(g[1, 20:])
