"""Tests of the evaluation pass (plan, batch loop, ensembles) and its CLI."""

import json
import os
import subprocess
import sys

import conftest
import jax
import jax.numpy as jnp
import numpy as np
import portpicker
import pytest
from flax import nnx
from tensorboard.backend.event_processing import event_accumulator

from test_protocols import tiny_model
from vgg_jax import checkpointing
from vgg_jax import cli
from vgg_jax import eval_plan
from vgg_jax import evaluate
from vgg_jax import input_pipeline
from vgg_jax import metrics
from vgg_jax import preprocessing
from vgg_jax import protocols
from vgg_jax import reporting
from vgg_jax import sharding
from vgg_jax.configs import base

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CROP = 32
NUM_CLASSES = 5


def test_topk_hits_count_only_real_examples():
  rng = np.random.default_rng(1)
  post = jnp.asarray(rng.random((8, 10)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 8), jnp.int32)
  mask = jnp.asarray([True] * 6 + [False] * 2)
  top1, top5, count = (int(v) for v in metrics.topk_hits(post, labels, mask))
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
      [evaluate.Member(model, config)], protocols=protocols.PROTOCOLS,
      scales=SCALES, return_posteriors=True)
  return config, model, results


def _split_labels():
  return conftest.learnable_images(SPLIT_SIZE, 1)[1]


def test_loop_counts_every_example_once_and_scores_its_posteriors(loop):
  _, _, results = loop
  assert set(results) == set(protocols.PROTOCOLS)
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
  dense = jax.jit(lambda x, v: protocols.dense_posteriors(model, x, v))
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


@pytest.mark.slow  # fresh processes with fake devices
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


@pytest.fixture(scope='module')
def saved_run(loop, tmp_path_factory):
  config, model, _ = loop
  return _save_run(tmp_path_factory.mktemp('saved') / 'run', model, config)


def test_cli_evaluates_an_ensemble_and_writes_json_and_tensorboard(
    loop, saved_run, capsys):
  config, _, results = loop
  run = saved_run
  rc = cli.call(evaluate.define_flags, evaluate.main, [
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
  assert 'posteriors' not in got
  events = event_accumulator.EventAccumulator(os.path.join(run, 'eval'))
  events.Reload()
  tags = events.Tags()['tensors'] + events.Tags()['scalars']
  assert 'dense_q32-48_test_ensemble2/top1_error' in tags
  assert reporting.result_name(got) == 'dense_q32-48_test_ensemble2'


def test_config_overrides_are_typed_and_reach_every_member(saved_run):
  loaded = []
  def load(flag_values):
    loaded.extend(evaluate.members_from_flags(flag_values))
  rc = cli.call(evaluate.define_flags, load, [
      f'--workdir={saved_run}', f'--ensemble={saved_run}',
      '--config.input.scale_min=384', '--config.input.mean_rgb=1,2,3',
      '--config.data.manual_dir=/d', '--config.input.random_flip=false',
      '--config.train.learning_rate=1'])
  assert rc == 0 and len(loaded) == 2
  for member in loaded:
    config = member.config
    assert config.input.scale_min == 384
    assert tuple(config.input.mean_rgb) == (1.0, 2.0, 3.0)
    assert config.data.manual_dir == '/d'
    assert config.input.random_flip is False
    assert config.train.learning_rate == 1.0
    assert member.step == 3
  # Not written back: the run's own config is unchanged.
  assert checkpointing.read_config(saved_run).input.scale_min == 32


@pytest.mark.parametrize('arg, message, named', [
    ('--protocol=dence', 'Unknown protocol', 'dence'),
    ('--scales=16', 'smaller than the crop', '16'),
    ('--scales=16,big', 'comma-separated integers', '16,big'),
    ('--config.data.dir=x', 'Unknown config field', '--config.data.dir'),
    ('--config.input.scale_min=big', 'scale_min', 'big'),
    ('--batch_size=many', 'batch_size', 'many'),
])
def test_cli_rejects_bad_arguments_in_one_line(saved_run, capsys, arg,
                                               message, named):
  rc = cli.call(evaluate.define_flags, evaluate.main,
                [f'--workdir={saved_run}', arg])
  err = capsys.readouterr().err
  assert rc == 1
  errors = [line for line in err.splitlines() if ': error: ' in line]
  assert len(errors) == 1, err
  assert message in errors[0] and named in errors[0], errors[0]
  assert 'Traceback' not in err


@pytest.mark.parametrize('program', ['vgg_jax.evaluate', 'vgg_jax.predict'])
def test_helpfull_lists_the_programs_flags(program):
  out = subprocess.run([sys.executable, '-m', program, '--helpfull'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert f'{program.replace(".", "/")}.py:' in out.stdout, out.stderr[-2000:]
  for flag in ('--workdir', '--checkpoint', '--protocol', '--scales',
               '--config:'):
    assert flag in out.stdout
  assert 'Traceback' not in out.stderr


def test_cli_needs_a_workdir(capsys):
  rc = cli.call(evaluate.define_flags, evaluate.main, ['--protocol=dense'])
  assert rc == 1 and 'workdir' in capsys.readouterr().err


@pytest.mark.slow  # fresh processes with fake devices
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


def _tiny_config(**input_fields):
  config = base.get_config()
  config.input.crop_size = CROP
  config.input.update(input_fields)
  return config


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


def test_custom_batches_share_the_workers_and_must_agree():
  model = tiny_model()
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


def test_plan_averages_scales_sources_and_members_equally():
  model = tiny_model()
  config = _tiny_config(scale_min=32, scale_max=48)
  caffe = evaluate.Member(model, config, normalization='caffe_bgr',
                          scales=(32, 48), name='caffe')
  members = [evaluate.Member(model, config), evaluate.Member(model, config),
             caffe]
  plan = eval_plan.make_plan(members, ('multi_crop_dense', 'center_crop'),
                             None, False, 5, sharding.create_mesh())
  assert plan.scales == [(40,), (40,), (32, 48)]  # Q = mid of [32, 48]
  for terms in plan.terms.values():
    assert sum(c for _, c in terms) == pytest.approx(1.0)
    by_member = [sum(c for (i, _, _), c in terms if i == m) for m in range(3)]
    np.testing.assert_allclose(by_member, [1 / 3] * 3)
  assert len(plan.terms['multi_crop_dense']) == 2 + 2 + 2 * 2
  # One program per source for the two alike members, others for caffe_bgr.
  assert plan.programs[0] == plan.programs[1]
  assert plan.programs[2]['dense'] is not plan.programs[0]['dense']
  assert len(plan.all_programs()) == 2 * 3
  # Centre crops read their own streams; dense and multi-crop share one.
  assert plan.protocol_streams('multi_crop_dense') == {
      ('full', 40, None), ('full', 32, None), ('full', 48, None)}
  assert len(plan.stream_keys()) == 6
  with pytest.raises(ValueError, match='caffe: test scale 16 is smaller'):
    eval_plan.make_plan([caffe, members[0]], ('dense',), (16,), False, 5,
                        sharding.create_mesh())
