"""Tests of the paper's test protocols as device-side kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vgg_jax import models
from vgg_jax import preprocessing
from vgg_jax import protocols
from vgg_jax.configs import base

CROP = 32
NUM_CLASSES = 5


def tiny_model(num_classes=NUM_CLASSES, seed=0, arrays=None):
  """A tiny VGG-A with He-normal weights (or ``arrays``), in eval mode.

  The weights are drawn with NumPy into an abstract model: ``create_model``'s
  own init compiles one random program per shape, which costs more than
  every test here together on a 2-core machine.

  Args:
    num_classes: FC-8 width.
    seed: NumPy seed.
    arrays: optional ``{'blocks/0/convs/0/kernel': array, ...}`` to use
      instead of random weights.
  """
  rng = np.random.default_rng(seed)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: models.create_model(
      'vgg11', width_multiplier=1 / 16, num_classes=num_classes,
      fc6_kernel=1, init='he')))

  def fill(node, prefix):
    for k, v in node.items():
      key = prefix + (str(k),)
      name = '/'.join(key)
      if isinstance(v, dict):
        fill(v, key)
      elif arrays is not None and name in arrays:
        node[k] = jnp.asarray(arrays[name])
      elif jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key):
        node[k] = jax.random.key(0)
      elif k == 'kernel':
        fan_in = int(np.prod(v.shape[:-1]))
        node[k] = jnp.asarray(rng.normal(0, np.sqrt(2 / fan_in), v.shape),
                              v.dtype)
      else:
        node[k] = jnp.zeros(v.shape, v.dtype)
  pure = nnx.to_pure_dict(state)
  fill(pure, ())
  nnx.replace_by_pure_dict(state, pure)
  model = nnx.merge(graphdef, state)
  model.eval()
  return model


@pytest.fixture(scope='module')
def model():
  return tiny_model()


def _canvas(images, side):
  canvas = np.zeros((len(images), side, side, 3), np.float32)
  for i, im in enumerate(images):
    canvas[i, :im.shape[0], :im.shape[1]] = im
  sizes = np.array([im.shape[:2] for im in images], np.int32)
  return jnp.asarray(canvas), jnp.asarray(sizes)


def _softmax(x):
  return np.asarray(jax.nn.softmax(jnp.asarray(x), axis=-1))


@pytest.fixture(scope='module')
def images():
  rng = np.random.default_rng(0)
  # Odd sizes, not multiples of 32, both orientations.
  return [rng.normal(size=(h, w, 3)).astype(np.float32)
          for h, w in ((40, 57), (71, 45), (37, 36))]


def _tiny_config(**input_fields):
  config = base.get_config()
  config.input.crop_size = CROP
  config.input.update(input_fields)
  return config


def test_default_scales_follow_the_paper():
  fixed = _tiny_config(crop_size=224, scale_min=256, scale_max=256)
  assert protocols.default_scales(fixed) == (256,)
  assert protocols.default_scales(fixed, multi_scale=True) == (224, 256, 288)
  jittered = _tiny_config(crop_size=224, scale_min=256, scale_max=512)
  assert protocols.default_scales(jittered) == (384,)
  assert protocols.default_scales(jittered, multi_scale=True) == (256, 384, 512)
  quick = _tiny_config(scale_min=32, scale_max=48)
  assert protocols.default_scales(quick) == (40,)
  assert protocols.default_scales(quick, multi_scale=True) == (32, 40, 48)
  # S - 32 would be below the crop: raised to it, duplicates dropped.
  small = _tiny_config(scale_min=32, scale_max=32)
  assert protocols.default_scales(small, multi_scale=True) == (32, 64)


def test_parsers_reject_bad_input():
  assert protocols.parse_scales('256, 384,512') == (256, 384, 512)
  assert protocols.parse_scales(None) is None
  with pytest.raises(ValueError, match='comma-separated integers'):
    protocols.parse_scales('256,big')
  assert protocols.parse_protocols('dense,multi_crop') == ('dense',
                                                          'multi_crop')
  with pytest.raises(ValueError, match='Unknown protocol'):
    protocols.parse_protocols('dense,dens')


def test_dense_equals_hand_computed_score_map_average(model, images):
  canvas, sizes = _canvas(images, 96)
  dense = jax.jit(lambda x, v, flip: protocols.dense_posteriors(
      model, x, v, flip=flip), static_argnums=2)
  got = np.asarray(dense(canvas, sizes, False))
  got_flip = np.asarray(dense(canvas, sizes, True))
  score_map = jax.jit(lambda x: model.score_map(x))
  for i, im in enumerate(images):
    # The paper's recipe on the unpadded image: score map, mean, softmax.
    scores = np.asarray(score_map(jnp.asarray(im[None])))
    want = _softmax(scores.mean(axis=(1, 2)))[0]
    np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-6)
    flipped = np.asarray(score_map(jnp.asarray(im[None, :, ::-1])))
    want_flip = _softmax(flipped.mean(axis=(1, 2)))[0]
    np.testing.assert_allclose(got_flip[i], 0.5 * (want + want_flip),
                               rtol=1e-4, atol=1e-6)
  # Unequal images give unequal posteriors (the check above is not vacuous).
  assert np.abs(got[0] - got[1]).max() > 1e-4


def test_flip_valid_mirrors_only_the_image():
  x = jnp.arange(2 * 2 * 5 * 1, dtype=jnp.float32).reshape(2, 2, 5, 1)
  out = np.asarray(protocols.flip_valid(x, jnp.array([[2, 3], [2, 5]])))
  np.testing.assert_array_equal(out[0, 0, :, 0], [2, 1, 0, 3, 4])
  np.testing.assert_array_equal(out[1, 1, :, 0], [19, 18, 17, 16, 15])


def test_multi_crop_visits_the_5x5_grid_and_flips(model, images):
  canvas, sizes = _canvas(images, 96)
  crops, offsets = protocols.multi_crop_windows(canvas, sizes, CROP)
  crops, offsets = np.asarray(crops), np.asarray(offsets)
  assert crops.shape == (len(images), 25, CROP, CROP, 3)
  got = np.asarray(protocols.multi_crop_posteriors(model, canvas, sizes,
                                                  crop_size=CROP))
  for i, im in enumerate(images):
    h, w = im.shape[:2]
    want = protocols.crop_offsets(h, w, CROP)
    np.testing.assert_array_equal(offsets[i], want)
    tops, lefts = sorted(set(want[:, 0])), sorted(set(want[:, 1]))
    assert len(tops) == 5 and len(lefts) == 5  # a regular 5x5 grid
    assert (tops[0], tops[-1], lefts[0], lefts[-1]) == (0, h - CROP,
                                                         0, w - CROP)
    assert np.all(np.diff(tops) > 0) and np.all(np.diff(lefts) > 0)
    # Each crop is the image window at its offset; with flips, 50 distinct.
    windows = [im[t:t + CROP, l:l + CROP] for t, l in want]
    for k, window in enumerate(windows):
      np.testing.assert_array_equal(crops[i, k], window)
    all_crops = windows + [c[:, ::-1] for c in windows]
    assert len({c.tobytes() for c in all_crops}) == 50
    # The posterior is the mean over the 50 crops' posteriors.
    batch = jnp.asarray(np.stack(all_crops))
    want_p = _softmax(np.asarray(model(batch))).mean(axis=0)
    np.testing.assert_allclose(got[i], want_p, rtol=1e-4, atol=1e-6)


def test_crop_offsets_need_an_image_at_least_the_crop():
  with pytest.raises(ValueError, match='smaller than the 32'):
    protocols.crop_offsets(31, 64, 32)


def test_passes_per_image_are_the_papers_counts():
  assert protocols.passes_per_image('multi_crop', 1) == 50
  assert protocols.passes_per_image('multi_crop', 3) == 150
  assert protocols.passes_per_image('dense', 3) == 6  # image + flip
  assert protocols.passes_per_image('center_crop', 2) == 2
  assert protocols.passes_per_image('multi_crop_dense', 1) == 52


def test_source_fn_normalises_and_runs_the_named_source(model):
  rng = np.random.default_rng(2)
  pixels = jnp.asarray(rng.integers(0, 256, (2, 40, 48, 3)), jnp.uint8)
  sizes = jnp.asarray([[40, 48], [36, 33]], jnp.int32)
  graphdef, rng_state, weights = nnx.split(model, nnx.RngState, ...)
  normalize = preprocessing.normalizer('imagenet_mean_std')
  x = normalize(pixels)
  want = {
      'dense': protocols.dense_posteriors(model, x, sizes),
      'multi_crop': protocols.multi_crop_posteriors(model, x, sizes,
                                                    crop_size=CROP),
      'center_crop': protocols.center_crop_posteriors(model, x),
  }
  for source, expected in want.items():
    fn = protocols.SourceFn(graphdef, rng_state, normalize, source, CROP)
    got = jax.jit(fn)(weights, pixels, sizes)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
  # The three sources differ on these inputs (the loop above can tell).
  assert np.abs(want['dense'] - want['multi_crop']).max() > 1e-4
  with pytest.raises(ValueError, match='Unknown posterior source'):
    protocols.source_posteriors('multi_crop_dense', model, x, sizes,
                                crop_size=CROP)
