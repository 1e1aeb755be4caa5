"""Perceptual losses against a NumPy reference, and their contracts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgg_jax import models
from vgg_jax import perceptual
from vgg_jax import pretrained

TINY = dict(width_multiplier=1 / 16, num_classes=5, fc6_kernel=1, init='he')
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68])


@pytest.fixture(scope='module')
def vgg16():
  return models.create_model('vgg16', **TINY)


@pytest.fixture(scope='module')
def images():
  rng = np.random.RandomState(0)
  return [jnp.asarray(rng.uniform(0, 1, (2, 32, 32, 3)), jnp.float32)
          for _ in range(3)]


def np_normalize(images, normalization, mean_rgb):
  x = np.asarray(images, np.float64)
  if normalization == 'caffe_bgr':
    return x[..., ::-1] * 255 - CAFFE_MEAN_BGR
  if normalization == 'imagenet_mean_std':
    return (x - np.array([0.485, 0.456, 0.406])) / np.array(
        [0.229, 0.224, 0.225])
  return x * 255 - np.asarray(mean_rgb)


def np_relus(model, x):
  """Every ``relu{b}_{i}`` of a plain (no BN, no LRN) VGG, float64 NumPy."""
  out = {}
  for b, block in enumerate(model.blocks):
    for i, conv in enumerate(block.convs):
      kernel = np.asarray(conv.kernel[...], np.float64)  # HWIO
      k = kernel.shape[0]
      n, h, w, _ = x.shape
      xp = np.pad(x, ((0, 0), (k // 2,) * 2, (k // 2,) * 2, (0, 0)))
      y = sum(np.einsum('nhwc,co->nhwo', xp[:, dy:dy + h, dx:dx + w],
                        kernel[dy, dx]) for dy in range(k) for dx in range(k))
      x = np.maximum(y + np.asarray(conv.bias[...], np.float64), 0)
      out[f'relu{b + 1}_{i + 1}'] = x
    n, h, w, c = x.shape
    x = x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
  return out


def np_gram(f):
  n, h, w, c = f.shape
  f = f.reshape(n, h * w, c)
  return np.einsum('npc,npd->ncd', f, f) / (c * h * w)


def np_losses(model, x, y, style, normalization, mean_rgb, content, styles,
              distance):
  """Per-example content and style losses, as the papers write them."""
  fx, fy, fs = (np_relus(model, np_normalize(v, normalization, mean_rgb))
                for v in (x, y, style))
  diff = {k: fx[k] - fy[k] for k in content}
  err = {k: d * d if distance == 'l2' else np.abs(d) for k, d in diff.items()}
  c = sum(w * err[k].mean(axis=(1, 2, 3)) for k, w in content.items())
  s = sum(w * ((np_gram(fx[k]) - np_gram(fs[k])) ** 2).sum(axis=(1, 2))
          for k, w in styles.items())
  return c, s


@pytest.mark.parametrize('normalization,mean_rgb,distance', [
    ('caffe_bgr', None, 'l2'),
    ('imagenet_mean_std', None, 'l1'),
    ('mean_rgb', (100.0, 110.0, 120.0), 'l2'),
])
def test_matches_numpy_reference(vgg16, images, normalization, mean_rgb,
                                 distance):
  x, y, style = images
  content = {'relu1_2': 1.0, 'relu2_2': 0.5, 'relu3_3': 2.0, 'relu4_3': 0.25}
  styles = {'relu1_1': 3.0, 'relu2_1': 1.0, 'relu3_1': 1.0, 'relu4_1': 0.5,
            'relu5_1': 2.0}
  loss = perceptual.PerceptualLoss.from_model(
      vgg16, normalization=normalization, mean_rgb=mean_rgb,
      content_layers=content, style_layers=styles, distance=distance)
  want_c, want_s = np_losses(vgg16, x, y, style[:1], normalization,
                             mean_rgb, content, styles, distance)
  np.testing.assert_allclose(
      loss.content_loss(x, y, reduction='none'), want_c, rtol=2e-4)
  np.testing.assert_allclose(
      loss.style_loss(x, style[:1], reduction='none'), want_s, rtol=2e-4)
  np.testing.assert_allclose(loss(x, y, style[:1]), (want_c + want_s).mean(),
                             rtol=2e-4)
  np.testing.assert_allclose(loss(x, y, style[:1], reduction='sum'),
                             (want_c + want_s).sum(), rtol=2e-4)
  assert want_c.min() > 0 and want_s.min() > 0


def test_defaults_are_the_papers_layers(vgg16):
  loss = perceptual.PerceptualLoss.from_model(vgg16,
                                              normalization='caffe_bgr')
  assert loss.content_layers == tuple(
      (k, 1.0) for k in ('relu1_2', 'relu2_2', 'relu3_3', 'relu4_3'))
  assert loss.style_layers == tuple(
      (k, 1.0) for k in ('relu1_1', 'relu2_1', 'relu3_1', 'relu4_1',
                         'relu5_1'))
  assert loss.distance == 'l2'


def test_zero_for_identical_images_positive_otherwise(vgg16, images):
  x, y, _ = images
  loss = perceptual.PerceptualLoss.from_model(
      vgg16, normalization='imagenet_mean_std')
  for fn in (loss.content_loss, loss.style_loss):
    assert float(fn(x, x)) == 0.0
    per_example = fn(x, y, reduction='none')
    assert per_example.shape == (2,) and per_example.min() > 0
  # Batchable: a per-example loss is the loss of that example alone.
  np.testing.assert_allclose(loss(x, y, y, reduction='none')[1],
                             loss(x[1:], y[1:], y[1:]), rtol=1e-5)
  assert float(loss(x, x, x)) == 0.0


def test_gradients_reach_the_images_only(vgg16, images):
  x, y, style = images
  loss = perceptual.PerceptualLoss.from_model(
      vgg16, normalization='caffe_bgr')
  g = jax.grad(lambda v: loss(v, y, style))(x)
  assert g.shape == x.shape and np.isfinite(g).all() and np.abs(g).max() > 0
  g_loss = jax.grad(lambda l: l(x, y, style), allow_int=True)(loss)
  floats = [v for v in jax.tree.leaves(g_loss.state)
            if jnp.issubdtype(v.dtype, jnp.inexact)]
  assert floats and not any(np.any(np.asarray(v)) for v in floats)


def test_jit_equals_eager(vgg16, images):
  x, y, style = images
  loss = perceptual.PerceptualLoss.from_model(
      vgg16, normalization='caffe_bgr', distance='l1')
  jitted = jax.jit(lambda l, a, b, c: l(a, b, c, reduction='none'))(
      loss, x, y, style)
  with jax.disable_jit():
    eager = loss(x, y, style, reduction='none')
  np.testing.assert_allclose(jitted, eager, rtol=1e-5)
  np.testing.assert_allclose(loss(x, y, style, reduction='none'), eager,
                             rtol=1e-5)


def test_precomputed_targets_and_style_of_another_size(vgg16, images):
  x, y, _ = images
  loss = perceptual.PerceptualLoss.from_model(
      vgg16, normalization='caffe_bgr')
  style = jnp.asarray(np.random.RandomState(1).uniform(0, 1, (1, 48, 64, 3)),
                      jnp.float32)
  grams = loss.grams(style)
  assert grams['relu2_1'].shape == (1, 8, 8)
  np.testing.assert_allclose(loss.style_loss(x, grams),
                             loss.style_loss(x, style), rtol=1e-6)
  feats = loss.features(y)
  assert list(feats) == ['relu1_2', 'relu2_2', 'relu3_3', 'relu4_3']
  np.testing.assert_allclose(loss.content_loss(x, feats),
                             loss.content_loss(x, y), rtol=1e-6)


def test_layers_the_net_lacks_name_the_valid_ones():
  vgg11 = models.abstract_model('vgg11', **TINY)
  with pytest.raises(ValueError, match=(
      r"Bad content layers: vgg11 has no layer\(s\) 'relu1_2', 'relu2_2', "
      r"'relu3_3', 'relu4_3'; valid layers of vgg11: .*relu3_2")):
    perceptual.PerceptualLoss.from_model(vgg11, normalization='caffe_bgr')
  with pytest.raises(ValueError, match=r"Bad style layers.*'relu6_1'"):
    perceptual.PerceptualLoss.from_model(
        vgg11, normalization='caffe_bgr', content_layers=['relu3_2'],
        style_layers=['relu1_1', 'relu6_1'])


def test_bad_arguments_are_clear_errors(vgg16, images):
  x, y, _ = images
  with pytest.raises(ValueError, match="Unknown distance 'l3'"):
    perceptual.PerceptualLoss.from_model(vgg16, normalization='caffe_bgr',
                                         distance='l3')
  with pytest.raises(ValueError, match='Unknown normalization'):
    perceptual.PerceptualLoss.from_model(vgg16, normalization='bgr')
  loss = perceptual.PerceptualLoss.from_model(
      vgg16, normalization='caffe_bgr', style_layers=())
  with pytest.raises(ValueError, match="Unknown reduction 'avg'"):
    loss.content_loss(x, y, reduction='avg')
  with pytest.raises(ValueError, match='float'):
    loss.content_loss((x * 255).astype(jnp.uint8), y)
  with pytest.raises(ValueError, match='no style layers'):
    loss.style_loss(x, y)
  with pytest.raises(ValueError, match='content targets, style targets'):
    loss(x)


def test_model_is_left_as_it_was(images):
  model = models.create_model('vgg11_bn', **TINY, dropout_rate=0.5)
  model.train()
  loss = perceptual.PerceptualLoss.from_model(
      model, normalization='caffe_bgr', content_layers=['bn2_1', 'relu3_2'],
      style_layers=['relu1_1'])
  assert not model.dropout.deterministic
  assert not model.blocks[0].norms[0].use_running_average
  x, y, _ = images
  # Eval mode: BN uses running statistics, so the loss is deterministic and
  # the model's statistics do not move.
  before = np.asarray(model.blocks[0].norms[0].mean[...])
  assert float(loss(x, y)) == float(loss(x, y)) > 0
  np.testing.assert_array_equal(model.blocks[0].norms[0].mean[...], before)


def test_from_pretrained_uses_the_dirs_normalization(vgg16, images, tmp_path):
  meta = pretrained.make_metadata('vgg16', normalization='mean_rgb',
                                  mean_rgb=(90.0, 100.0, 110.0), **TINY)
  pretrained.save_pretrained(tmp_path / 'pt', vgg16, meta)
  loss = perceptual.PerceptualLoss.from_pretrained(tmp_path / 'pt')
  assert (loss.normalization, loss.mean_rgb) == ('mean_rgb',
                                                 (90.0, 100.0, 110.0))
  x, y, style = images
  want = perceptual.PerceptualLoss.from_model(
      vgg16, normalization='mean_rgb', mean_rgb=(90.0, 100.0, 110.0))
  np.testing.assert_allclose(loss(x, y, style), want(x, y, style), rtol=1e-6)
