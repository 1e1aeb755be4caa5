"""Tests of the paper's test protocols, ensembles and the evaluation loop."""

import json
import os
import subprocess
import sys

import conftest
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tensorboard.backend.event_processing import event_accumulator

from vgg_jax import checkpointing
from vgg_jax import evaluate
from vgg_jax import input_pipeline
from vgg_jax import models
from vgg_jax import preprocessing
from vgg_jax.configs import base

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
  assert evaluate.default_scales(fixed) == (256,)
  assert evaluate.default_scales(fixed, multi_scale=True) == (224, 256, 288)
  jittered = _tiny_config(crop_size=224, scale_min=256, scale_max=512)
  assert evaluate.default_scales(jittered) == (384,)
  assert evaluate.default_scales(jittered, multi_scale=True) == (256, 384, 512)
  quick = _tiny_config(scale_min=32, scale_max=48)
  assert evaluate.default_scales(quick) == (40,)
  assert evaluate.default_scales(quick, multi_scale=True) == (32, 40, 48)
  # S - 32 would be below the crop: raised to it, duplicates dropped.
  small = _tiny_config(scale_min=32, scale_max=32)
  assert evaluate.default_scales(small, multi_scale=True) == (32, 64)


def test_parsers_reject_bad_input():
  assert evaluate.parse_scales('256, 384,512') == (256, 384, 512)
  assert evaluate.parse_scales(None) is None
  with pytest.raises(ValueError, match='comma-separated integers'):
    evaluate.parse_scales('256,big')
  assert evaluate.parse_protocols('dense,multi_crop') == ('dense',
                                                          'multi_crop')
  with pytest.raises(ValueError, match='Unknown protocol'):
    evaluate.parse_protocols('dense,dens')


def test_config_overrides_are_typed():
  overrides, rest = evaluate.parse_config_overrides(
      ['--workdir=x', '--config.input.scale_min=384',
       '--config.input.mean_rgb=1,2,3', '--config.data.manual_dir=/d',
       '--config.input.random_flip=false', '--config.train.learning_rate=1'])
  assert rest == ['--workdir=x']
  config = evaluate.apply_overrides(base.get_config(), overrides)
  assert config.input.scale_min == 384
  assert tuple(config.input.mean_rgb) == (1.0, 2.0, 3.0)
  assert config.data.manual_dir == '/d'
  assert config.input.random_flip is False
  assert config.train.learning_rate == 1.0
  with pytest.raises(ValueError, match='Unknown config field'):
    evaluate.apply_overrides(base.get_config(), {'input.scale': '3'})
  with pytest.raises(ValueError, match='scale_min'):
    evaluate.apply_overrides(base.get_config(), {'input.scale_min': 'big'})


def test_dense_equals_hand_computed_score_map_average(model, images):
  canvas, sizes = _canvas(images, 96)
  dense = jax.jit(lambda x, v, flip: evaluate.dense_posteriors(
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
  out = np.asarray(evaluate.flip_valid(x, jnp.array([[2, 3], [2, 5]])))
  np.testing.assert_array_equal(out[0, 0, :, 0], [2, 1, 0, 3, 4])
  np.testing.assert_array_equal(out[1, 1, :, 0], [19, 18, 17, 16, 15])


def test_multi_crop_visits_the_5x5_grid_and_flips(model, images):
  canvas, sizes = _canvas(images, 96)
  crops, offsets = evaluate.multi_crop_windows(canvas, sizes, CROP)
  crops, offsets = np.asarray(crops), np.asarray(offsets)
  assert crops.shape == (len(images), 25, CROP, CROP, 3)
  got = np.asarray(evaluate.multi_crop_posteriors(model, canvas, sizes,
                                                  crop_size=CROP))
  for i, im in enumerate(images):
    h, w = im.shape[:2]
    want = evaluate.crop_offsets(h, w, CROP)
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
    evaluate.crop_offsets(31, 64, 32)


def test_topk_hits_count_only_real_examples():
  rng = np.random.default_rng(1)
  post = jnp.asarray(rng.random((8, 10)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 8), jnp.int32)
  mask = jnp.asarray([True] * 6 + [False] * 2)
  top1, top5, count = (int(v) for v in evaluate.topk_hits(post, labels, mask))
  order = np.argsort(-np.asarray(post), axis=1)
  want1 = sum(order[i, 0] == labels[i] for i in range(6))
  want5 = sum(labels[i] in order[i, :5] for i in range(6))
  assert (top1, top5, count) == (want1, want5, 6)
  assert top5 >= top1


# ----------------------------------------------------------------------------
# The evaluation loop on a tiny Fashion-MNIST-format split (40 test images).

SPLIT_SIZE = 40
EVAL_BATCH = 16  # 40 = 2 full batches + 8 examples and 8 padding rows
SCALES = (32, 48)  # canvases 32 and 64 (square images, dense_max_aspect 1)


def _loop_config(fashion_idx_dir, data_dir):
  config = base.get_config()
  config.model.update(name='vgg11', num_classes=10, width_multiplier=1 / 16,
                      fc6_kernel=1, init='he')
  config.data.dataset = 'fashion_mnist'
  config.data.eval_split = 'test'
  config.data.manual_dir = str(fashion_idx_dir)
  config.data.data_dir = str(data_dir)
  config.data.num_workers = 0
  # Unit-scale inputs keep a random net's posteriors away from one-hot.
  config.input.update(scale_min=32, scale_max=48, crop_size=CROP,
                      normalization='imagenet_mean_std', dense_max_aspect=1.0)
  config.train.eval_batch_size = EVAL_BATCH
  return config


def _loop_model(arrays=None):
  return tiny_model(num_classes=10, seed=3, arrays=arrays)


def _save_weights(model, path):
  flat = nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))
  np.savez(path, **{'/'.join(map(str, p)): np.asarray(v[...]) for p, v in flat})


@pytest.fixture(scope='module')
def loop(fashion_idx_dir, tmp_path_factory):
  """One pass of all four protocols on one device, with posteriors."""
  config = _loop_config(fashion_idx_dir, tmp_path_factory.mktemp('tfds'))
  model = _loop_model()
  results = evaluate.evaluate(
      [evaluate.Member(model, config)], protocols=evaluate.PROTOCOLS,
      scales=SCALES, return_posteriors=True)
  return config, model, results


def _split_labels():
  return conftest.learnable_images(SPLIT_SIZE, 1)[1]


def test_loop_counts_every_example_once_and_scores_its_posteriors(loop):
  _, _, results = loop
  assert set(results) == set(evaluate.PROTOCOLS)
  for name, r in results.items():
    labels = _split_labels()
    assert r['num_examples'] == SPLIT_SIZE, name
    assert r['num_devices'] == jax.device_count()
    # Each example once (TFDS stores the split in its own order).
    np.testing.assert_array_equal(r['index'], np.arange(SPLIT_SIZE))
    np.testing.assert_array_equal(np.sort(r['labels']), np.sort(labels))
    labels = r['labels']
    post = r['posteriors']
    assert post.shape == (SPLIT_SIZE, 10)
    np.testing.assert_allclose(post.sum(axis=1), 1.0, rtol=1e-5)
    order = np.argsort(-post, axis=1)
    assert r['top1_accuracy'] == pytest.approx(
        np.mean(order[:, 0] == labels))
    assert r['top5_accuracy'] == pytest.approx(
        np.mean([l in o[:5] for l, o in zip(labels, order)]))
    assert r['top5_accuracy'] >= r['top1_accuracy']
    assert r['top1_error'] == pytest.approx(1 - r['top1_accuracy'])
    assert r['scales'] == list(SCALES) and r['wall_time_s'] > 0
  np.testing.assert_allclose(
      results['multi_crop_dense']['posteriors'],
      0.5 * (results['dense']['posteriors'] +
             results['multi_crop']['posteriors']), rtol=1e-5, atol=1e-7)
  # Protocols differ (otherwise the checks above could not tell them apart).
  assert np.abs(results['dense']['posteriors'] -
                results['multi_crop']['posteriors']).max() > 1e-3
  assert results['multi_crop']['passes_per_image'] == 50 * len(SCALES)


def test_dense_compiles_one_program_per_scale(loop):
  _, _, results = loop
  shapes = results['dense']['program_input_shapes']['dense']
  assert shapes == [[EVAL_BATCH, 32, 32, 3], [EVAL_BATCH, 64, 64, 3]]
  assert results['dense']['programs_compiled'] == len(SCALES)
  assert results['multi_crop_dense']['programs_compiled'] == 2 * len(SCALES)


def test_loop_dense_equals_protocol_on_the_pipeline_batch(loop):
  config, model, results = loop
  model.eval()
  dense = jax.jit(lambda x, v: evaluate.dense_posteriors(model, x, v))
  want = 0.0
  for q in SCALES:
    batch = next(iter(input_pipeline.create_eval_iterator(
        config, scale=q, mode='full')))
    x = preprocessing.normalize(batch['image'], 'imagenet_mean_std')
    want = want + np.asarray(dense(x, jnp.asarray(batch['valid_size'])))
  np.testing.assert_allclose(results['dense']['posteriors'][:EVAL_BATCH],
                             want / len(SCALES), rtol=1e-4, atol=1e-6)


def test_ensemble_of_a_run_with_itself_equals_the_run(loop):
  config, model, results = loop
  member = evaluate.Member(model, config)
  ensemble = evaluate.evaluate([member, member], protocols='dense',
                               scales=SCALES, return_posteriors=True)['dense']
  np.testing.assert_allclose(ensemble['posteriors'],
                             results['dense']['posteriors'], rtol=1e-6)
  for key in ('top1_error', 'top5_error', 'num_examples'):
    assert ensemble[key] == results['dense'][key]
  assert len(ensemble['members']) == 2
  # Members of one architecture share their programs.
  assert ensemble['programs_compiled'] == len(SCALES)


_DEVICES_SCRIPT = '''
import json, sys
sys.path.insert(0, {tests!r})
import jax
import numpy as np
import conftest
import test_evaluate as t
from vgg_jax import evaluate
if {procs} > 1:
  jax.distributed.initialize('localhost:{port}', num_processes={procs},
                             process_id=int(sys.argv[1]))
config = t._loop_config({idx!r}, {data_dir!r})
model = t._loop_model(dict(np.load({weights!r})))
results = evaluate.evaluate([evaluate.Member(model, config)],
                            protocols={protocols!r}, scales={scales!r},
                            return_posteriors=True)
if jax.process_index() == 0:
  np.savez({out!r}, devices=jax.device_count(), **{{
      p + '/' + k: np.asarray(r[k]) for p, r in results.items()
      for k in ('posteriors', 'labels', 'index', 'num_examples',
                'top1_error')}})
'''


def _run_devices(loop_config, model, tmp_path, devices, procs=1,
                 protocols='dense,multi_crop', scales=SCALES):
  """Evaluates in fresh processes with ``devices`` fake devices each."""
  out = tmp_path / f'devices{devices}x{procs}.npz'
  weights = tmp_path / 'weights.npz'
  _save_weights(model, weights)
  code = _DEVICES_SCRIPT.format(
      tests=os.path.join(ROOT, 'tests'), procs=procs, port=0,
      idx=loop_config.data.manual_dir, data_dir=loop_config.data.data_dir,
      weights=str(weights), out=str(out), protocols=protocols,
      scales=tuple(scales))
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=(
      f'--xla_force_host_platform_device_count={devices}'))
  if procs == 1:
    ps = [subprocess.Popen([sys.executable, '-c', code, '0'], env=env,
                           cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)]
  else:
    import portpicker  # pylint: disable=g-import-not-at-top
    code = code.replace("'localhost:0'",
                        f"'localhost:{portpicker.pick_unused_port()}'")
    env['JAX_CPU_COLLECTIVES_IMPLEMENTATION'] = 'gloo'
    ps = [subprocess.Popen([sys.executable, '-c', code, str(i)], env=env,
                           cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
          for i in range(procs)]
  for p in ps:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  return dict(np.load(out))


def test_four_devices_match_one_device(loop, tmp_path):
  config, model, results = loop
  four = _run_devices(config, model, tmp_path, devices=4)
  assert int(four['devices']) == 4
  for p in ('dense', 'multi_crop'):
    r = results[p]
    assert int(four[f'{p}/num_examples']) == SPLIT_SIZE  # padding not counted
    np.testing.assert_array_equal(four[f'{p}/labels'], r['labels'])
    np.testing.assert_allclose(four[f'{p}/posteriors'], r['posteriors'],
                               rtol=1e-4, atol=1e-6)
    assert float(four[f'{p}/top1_error']) == pytest.approx(r['top1_error'])


def _save_run(workdir, model, config, step=3):
  """A workdir as training leaves it: config.json and one checkpoint."""
  checkpointing.write_config(str(workdir), config)
  manager = checkpointing.create_manager(str(workdir), config)
  state = dict(step=jnp.asarray(step, jnp.int32),
               params=nnx.state(model, nnx.Param),
               batch_stats=nnx.state(model, nnx.BatchStat), opt_state={})
  meta = dict(step=step, model=dict(config.model),
              normalization=config.input.normalization,
              mean_rgb=list(config.input.mean_rgb),
              class_names=[f'class_{i}' for i in range(10)])
  manager.save(step, args=checkpointing.save_args(state, meta, None),
               metrics={'val_top1': 0.5})
  manager.wait_until_finished()
  manager.close()
  return str(workdir)


def test_cli_evaluates_an_ensemble_and_writes_json_and_tensorboard(
    loop, tmp_path, capsys):
  config, model, results = loop
  run = _save_run(tmp_path / 'run', model, config)
  rc = evaluate.main([
      f'--workdir={run}', '--checkpoint=best', '--protocol=dense',
      '--scales=32,48', f'--ensemble={run}',
      '--config.train.eval_batch_size=8',
      f'--config.data.data_dir={config.data.data_dir}'])
  assert rc == 0
  out = capsys.readouterr().out
  assert 'top-1 err' in out and 'dense' in out
  path = os.path.join(run, 'eval', 'dense_q32-48_test_ensemble2_step3.json')
  assert f'Wrote {path}' in out
  with open(path) as f:
    got = json.load(f)
  # The override reached the run's config; an ensemble of a run with itself
  # scores as the run.
  assert got['global_batch_size'] == 8 and got['num_batches'] == 5
  assert got['members'] == [run, run] and got['steps'] == [3, 3]
  assert got['num_examples'] == SPLIT_SIZE
  for key in ('top1_error', 'top5_error'):
    assert got[key] == pytest.approx(results['dense'][key])
  events = event_accumulator.EventAccumulator(os.path.join(run, 'eval'))
  events.Reload()
  tags = events.Tags()['tensors'] + events.Tags()['scalars']
  assert 'dense_q32-48_test_ensemble2/top1_error' in tags


def test_cli_rejects_bad_arguments_clearly(loop, tmp_path):
  config, model, _ = loop
  run = _save_run(tmp_path / 'run', model, config)
  with pytest.raises(ValueError, match='Unknown protocol'):
    evaluate.main([f'--workdir={run}', '--protocol=dence'])
  with pytest.raises(ValueError, match='smaller than the crop'):
    evaluate.main([f'--workdir={run}', '--scales=16'])
  with pytest.raises(ValueError, match='Unknown config field'):
    evaluate.main([f'--workdir={run}', '--config.data.dir=x'])


def test_two_processes_match_one_process(loop, tmp_path):
  config, model, _ = loop
  want = evaluate.evaluate([evaluate.Member(model, config)], protocols='dense',
                           scales=(48,), return_posteriors=True)['dense']
  two = _run_devices(config, model, tmp_path, devices=2, procs=2,
                     protocols='dense', scales=(48,))
  assert int(two['devices']) == 4
  assert int(two['dense/num_examples']) == SPLIT_SIZE
  # Posteriors gathered from both processes, put in the split's order.
  np.testing.assert_array_equal(two['dense/index'], np.arange(SPLIT_SIZE))
  np.testing.assert_array_equal(two['dense/labels'], want['labels'])
  np.testing.assert_allclose(two['dense/posteriors'], want['posteriors'],
                             rtol=1e-4, atol=1e-6)
  assert float(two['dense/top1_error']) == pytest.approx(want['top1_error'])


def _fake_iterator(seen, *, batches=3, label_shift=None):
  """Eval batches in the input pipeline's format, from a seeded generator."""
  def iterator_fn(config, *, split, scale, mode, global_batch_size):
    seen.append((split, scale, mode, config.data.num_workers))
    rng = np.random.default_rng(0)  # the same examples in every stream
    n = batches + (1 if label_shift and scale == 48 else 0)
    for b in range(n):
      labels = rng.integers(0, NUM_CLASSES, global_batch_size)
      if label_shift and scale == 48:
        labels = (labels + label_shift) % NUM_CLASSES
      yield {'image': rng.integers(0, 256, (global_batch_size, CROP, CROP, 3),
                                   np.uint8),
             'label': labels.astype(np.int32),
             'mask': np.arange(global_batch_size) < (
                 global_batch_size if b < batches - 1 else 3)}
  return iterator_fn


def test_custom_batches_share_the_workers_and_must_agree(model):
  config = _tiny_config(scale_min=32, scale_max=48)
  config.data.num_workers = 5
  member = evaluate.Member(model, config)
  seen = []
  r = evaluate.evaluate([member], protocols='center_crop', scales=(32, 48),
                        split='mine', batch_size=8,
                        iterator_fn=_fake_iterator(seen))['center_crop']
  assert r['num_examples'] == 8 + 8 + 3  # padding rows are not counted
  assert r['programs_compiled'] == 1  # both scales give 32x32 crops
  assert sorted(seen) == [('mine', 32, 'center_crop', 2),
                          ('mine', 48, 'center_crop', 2)]
  with pytest.raises(RuntimeError, match='disagree on labels'):
    evaluate.evaluate([member], protocols='center_crop', scales=(32, 48),
                      batch_size=8,
                      iterator_fn=_fake_iterator([], label_shift=1))
  with pytest.raises(ValueError, match='must be positive'):
    evaluate.evaluate([member], protocols='center_crop', batch_size=0,
                      iterator_fn=_fake_iterator([]))
