"""The model zoo against the paper (docs/paper.md §1) and the model's contracts."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vgg_jax import models

# Table 1 of the paper, transcribed independently of models.py: per block the
# conv layers as 'k-width', 'LRN' where it sits.
PAPER_TABLE = {
    'vgg11': [['3-64'], ['3-128'], ['3-256'] * 2, ['3-512'] * 2, ['3-512'] * 2],
    'vgg11_lrn': [['3-64', 'LRN'], ['3-128'], ['3-256'] * 2, ['3-512'] * 2,
                  ['3-512'] * 2],
    'vgg13': [['3-64'] * 2, ['3-128'] * 2, ['3-256'] * 2, ['3-512'] * 2,
              ['3-512'] * 2],
    'vgg16_c': [['3-64'] * 2, ['3-128'] * 2, ['3-256', '3-256', '1-256'],
                ['3-512', '3-512', '1-512'], ['3-512', '3-512', '1-512']],
    'vgg16': [['3-64'] * 2, ['3-128'] * 2, ['3-256'] * 3, ['3-512'] * 3,
              ['3-512'] * 3],
    'vgg19': [['3-64'] * 2, ['3-128'] * 2, ['3-256'] * 4, ['3-512'] * 4,
              ['3-512'] * 4],
    # Sec. 4.1: B with each pair of 3x3 convs replaced by one 5x5 conv.
    'vgg13_5x5': [['5-64'], ['5-128'], ['5-256'], ['5-512'], ['5-512']],
}
PAPER_PARAMS = {
    'vgg11': 132_863_336, 'vgg11_lrn': 132_863_336, 'vgg13': 133_047_848,
    'vgg16_c': 133_638_952, 'vgg16': 138_357_544, 'vgg19': 143_667_240,
    # Not in the paper's table; by hand: convs 3*64*25+64 + 64*128*25+128 +
    # 128*256*25+256 + 256*512*25+512 + 512*512*25+512 = 10,860,672, plus
    # the three FC layers.
    'vgg13_5x5': 10_860_672 + 123_642_856,
}
PAPER_GMAC = {'vgg11': 7.61, 'vgg13': 11.31, 'vgg16': 15.47, 'vgg19': 19.63}
FC_PARAMS = 123_642_856  # the three FC layers, docs/paper.md §1


def _conv_widths(name):
  return [int(layer.split('-')[1]) for block in PAPER_TABLE[name]
          for layer in block if layer != 'LRN']


# One compiled program per call site instead of op-by-op dispatch.
_run = nnx.jit(lambda model, x, **kw: model(x, **kw))
_score_map = nnx.jit(lambda model, x: model.score_map(x))


def tiny(name='vgg11', **kw):
  opts = dict(width_multiplier=1 / 16, num_classes=7, fc6_kernel=1, init='he')
  opts.update(kw)
  return models.create_model(name, **opts)


@pytest.mark.parametrize('name', sorted(PAPER_PARAMS))
def test_param_counts_match_paper(name):
  model = models.abstract_model(name)
  assert models.count_params(model) == PAPER_PARAMS[name]
  assert sum(models.count_params(fc) for fc in (model.fc6, model.fc7,
                                                model.fc8)) == FC_PARAMS


@pytest.mark.parametrize('name', sorted(PAPER_PARAMS))
def test_bn_variant_counts(name):
  model = models.abstract_model(name + '_bn')
  widths = sum(_conv_widths(name))
  # BN adds a scale and a bias per channel (torchvision's vgg16_bn has
  # 138,365,992 parameters) and two running statistics.
  assert models.count_params(model) == PAPER_PARAMS[name] + 2 * widths
  stats = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      nnx.state(model, nnx.BatchStat)))
  assert stats == 2 * widths
  if name == 'vgg16':
    assert models.count_params(model) == 138_365_992


@pytest.mark.parametrize('name', sorted(PAPER_GMAC))
def test_gmac_match_paper(name):
  assert models.count_macs(name, 224) / 1e9 == pytest.approx(
      PAPER_GMAC[name], abs=0.006)


def test_dense_eval_gmac_match_paper():
  # docs/paper.md §3: VGG-16 dense evaluation at Q = 256 / 384 / 512.
  for q, gmac in ((256, 20.5), (384, 49.6), (512, 92.5)):
    assert models.count_macs('vgg16', q) / 1e9 == pytest.approx(gmac, abs=0.06)


@pytest.mark.parametrize('name', sorted(PAPER_TABLE))
@pytest.mark.parametrize('bn', [False, True])
def test_layers_match_paper_table(name, bn):
  full = name + ('_bn' if bn else '')
  spec = models.layer_spec(full)
  expected = []
  for block in PAPER_TABLE[name]:
    for layer in block:
      if layer == 'LRN':
        expected.append('LRN')
      else:
        k, w = layer.split('-')
        expected.append(f'conv{k}-{w}')
        if bn:
          expected.append('BN')
    expected.append('maxpool')
  expected += ['FC-4096', 'FC-4096', 'FC-1000', 'soft-max']
  assert spec == expected
  # The built model has exactly those convs, in that order, with that LRN.
  model = models.abstract_model(full)
  built, c_in = [], 3
  for b, block in enumerate(model.blocks):
    for i, conv in enumerate(block.convs):
      kh, kw, cin, cout = conv.kernel.shape
      assert kh == kw and cin == c_in
      built.append(f'{kh}-{cout}')
      if block.lrn and i == 0:
        built.append('LRN')
      c_in = cout
    assert (block.norms is not None) == bn
  assert built == [layer for block in PAPER_TABLE[name] for layer in block]
  assert model.fc6.kernel.shape == (7, 7, 512, 4096)
  assert model.fc7.kernel.shape == (1, 1, 4096, 4096)
  assert model.fc8.kernel.shape == (1, 1, 4096, 1000)


def test_score_map_is_the_logits_at_224_and_averaged_at_256():
  model = models.create_model('vgg11', width_multiplier=1 / 16, num_classes=10,
                              init='he')  # fc6_kernel 7, as for ImageNet
  model.eval()
  x = jax.random.normal(jax.random.key(0), (2, 224, 224, 3))
  smap = _score_map(model, x)
  assert smap.shape == (2, 1, 1, 10)
  np.testing.assert_allclose(smap[:, 0, 0], _run(model, x), rtol=1e-6)
  x = jax.random.normal(jax.random.key(1), (2, 256, 256, 3))
  smap = _score_map(model, x)
  assert smap.shape == (2, 2, 2, 10)  # floor(256/32) - 6
  np.testing.assert_allclose(smap.mean(axis=(1, 2)), _run(model, x), rtol=1e-5,
                             atol=1e-6)
  assert not np.allclose(smap[:, 0, 0], smap[:, 1, 1])  # really scanned


def test_masked_canvas_equals_unpadded_image():
  model = tiny('vgg11_lrn_bn', fc6_kernel=2)
  model.eval()
  rng = np.random.RandomState(0)
  sizes = [(100, 150), (75, 64)]  # odd sizes exercise the pool borders
  canvas = np.zeros((2, 160, 160, 3), np.float32)
  expected = []
  for i, (h, w) in enumerate(sizes):
    img = rng.randn(1, h, w, 3).astype(np.float32)
    canvas[i, :h, :w] = img
    expected.append(_run(model, jnp.asarray(img))[0])
  got = _run(model, jnp.asarray(canvas), valid_size=jnp.array(sizes))
  np.testing.assert_allclose(got, np.stack(expected), rtol=1e-5, atol=1e-5)


def lrn_numpy(a, n=5, k=2.0, alpha=1e-4, beta=0.75):
  """AlexNet (Krizhevsky et al. 2012, Sec. 3.3), written as in the paper."""
  out = np.empty_like(a)
  channels = a.shape[-1]
  for i in range(channels):
    lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)
    s = (a[..., lo:hi + 1] ** 2).sum(-1)
    out[..., i] = a[..., i] / (k + alpha * s) ** beta
  return out


def test_lrn_matches_alexnet_formula():
  a = np.random.RandomState(0).uniform(0, 60, (2, 3, 4, 9)).astype(np.float32)
  np.testing.assert_allclose(models.local_response_norm(jnp.asarray(a)),
                             lrn_numpy(a.astype(np.float64)), rtol=1e-5)
  # Large activations are really damped (alpha not divided by n).
  big = np.full((1, 1, 1, 5), 100.0, np.float32)
  assert float(models.local_response_norm(jnp.asarray(big))[0, 0, 0, 2]) == (
      pytest.approx(100.0 / (2 + 1e-4 * 5 * 1e4) ** 0.75, rel=1e-5))


def test_lrn_sits_after_first_relu_of_a_lrn():
  model = tiny('vgg11_lrn')
  plain = tiny('vgg11')
  assert model.blocks[0].lrn and not any(b.lrn for b in model.blocks[1:])
  assert not any(b.lrn for b in plain.blocks)
  # Same weights, different outputs: the LRN is really applied.
  nnx.update(plain, nnx.state(model))
  model.eval(); plain.eval()
  x = 50 * jax.random.normal(jax.random.key(0), (1, 32, 32, 3))
  assert not np.allclose(_run(model, x), _run(plain, x))


def test_bf16_compute_matches_fp32():
  fp32 = tiny('vgg16_bn', width_multiplier=1 / 8)
  bf16 = tiny('vgg16_bn', width_multiplier=1 / 8, dtype='bfloat16')
  for leaf in jax.tree.leaves(nnx.state(bf16, nnx.Param)):
    assert leaf.dtype == jnp.float32
  nnx.update(bf16, nnx.state(fp32))
  fp32.eval(); bf16.eval()
  x = jax.random.normal(jax.random.key(0), (4, 64, 64, 3))
  a, b = _run(fp32, x), _run(bf16, x)
  assert b.dtype == jnp.float32
  # bf16 keeps 8 mantissa bits; through 13 convs logits agree to a few % of
  # their scale. Tolerance: 5% of the largest logit.
  np.testing.assert_allclose(a, b, atol=0.05 * float(jnp.abs(a).max()))
  assert not np.array_equal(a, b)  # the compute dtype really changed


def test_param_dtype_storage():
  model = tiny(param_dtype='bfloat16')
  assert all(x.dtype == jnp.bfloat16
             for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_feature_extraction_shapes():
  model = tiny('vgg16', width_multiplier=1 / 8)
  model.eval()
  feats = model.features(jnp.zeros((3, 64, 96, 3)))
  widths = [8, 16, 32, 64, 64]
  for b, w in enumerate(widths):
    s = 2 ** (b + 1)
    assert feats[f'pool{b + 1}'].shape == (3, 64 // s, 96 // s, w)
  assert feats['relu6'].shape == (3, 2, 3, 512)
  assert feats['relu7'].shape == (3, 2, 3, 512)
  assert feats['scores'].shape == (3, 2, 3, 7)


def test_dropout_only_in_training_mode():
  model = tiny(dropout_rate=0.5)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  model.eval()
  np.testing.assert_array_equal(model(x), model(x))
  model.train()
  a = model(x, rngs=nnx.Rngs(dropout=1))
  b = model(x, rngs=nnx.Rngs(dropout=2))
  assert not np.allclose(a, b)


@pytest.mark.parametrize('init,std', [('normal', 0.01), ('he', None),
                                      ('glorot', None)])
def test_init_schemes_and_zero_biases(init, std):
  model = models.create_model('vgg11', width_multiplier=1 / 4, init=init,
                              fc6_kernel=1, num_classes=10)
  k = np.asarray(model.blocks[3].convs[1].kernel[...])  # 3x3x128x128
  fan_in, fan_out = 9 * k.shape[2], 9 * k.shape[3]
  expected = {'normal': 0.01, 'he': np.sqrt(2 / fan_in),
              'glorot': np.sqrt(2 / (fan_in + fan_out))}[init]
  assert k.std() == pytest.approx(expected, rel=0.05)
  for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path[-1] == 'bias':
      assert not np.any(np.asarray(leaf[...]))


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match=r"Unknown model name 'vgg17'.*vgg16_bn"):
    models.create_model('vgg17')
  with pytest.raises(ValueError, match="Did you mean 'vgg16_bn'"):
    models.create_model('vgg16bn')


@pytest.mark.parametrize('options,pattern', [
    (dict(depth=3), r'Unknown model option\(s\) depth.*num_classes'),
    (dict(num_classes=0), 'Bad num_classes 0'),
    (dict(dropout_rate=1.5), r'Bad dropout_rate 1.5: must be in \[0, 1\)'),
    (dict(width_multiplier=-1), 'Bad width_multiplier'),
    (dict(fc6_kernel=2.5), 'Bad fc6_kernel'),
    (dict(init='uniform'), r"Unknown init scheme 'uniform'.*normal, glorot, he"),
    (dict(dtype='float33'), "Bad dtype 'float33'"),
])
def test_bad_options_are_clear_errors(options, pattern):
  with pytest.raises(ValueError, match=pattern):
    models.create_model('vgg11', **options)


def test_too_small_input_is_a_clear_error():
  model = tiny(fc6_kernel=7)
  with pytest.raises(ValueError, match='at least 224x224'):
    model(jnp.zeros((1, 64, 64, 3)))
