"""Training: the state, the step, the recipe, the loop, resume, NaN stop."""

import json
import os
import pathlib
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import train_straight_and_split

from vgg_jax import checkpointing
from vgg_jax import metrics
from vgg_jax import sharding
from vgg_jax import steps
from vgg_jax import train
from vgg_jax import weights

REPO = pathlib.Path(__file__).resolve().parents[1]


def _fixed_batch(n=16):
  rng = np.random.RandomState(0)
  return dict(image=jnp.asarray(rng.randint(0, 255, (n, 32, 32, 3)),
                                jnp.uint8),
              label=jnp.asarray(rng.randint(0, 10, n), jnp.int32))


@pytest.mark.parametrize('name', ['vgg11', 'vgg11_bn'])
def test_train_step_lowers_loss_on_a_fixed_batch(tiny_config, name):
  tiny_config.model.name = name
  setup, state = steps.create_train_state(tiny_config, sharding.create_mesh())
  step = steps.jit_train_step(setup, tiny_config)
  stats_before = jax.tree.map(np.asarray, state.batch_stats)
  batch = _fixed_batch()
  losses = []
  for _ in range(8):
    state, step_metrics, loss = step(
        state, batch, jnp.float32(tiny_config.train.learning_rate))
    losses.append(float(loss))
  assert losses[-1] < 0.9 * losses[0]
  assert isinstance(state, steps.TrainState) and int(state.step) == 8
  assert 0 <= float(step_metrics.compute()['top1']) <= 1
  if name.endswith('_bn'):  # running statistics move in training mode
    moved = jax.tree.map(lambda a, b: not np.allclose(a, np.asarray(b)),
                         stats_before, state.batch_stats)
    assert all(jax.tree.leaves(moved))
  else:
    assert not jax.tree.leaves(state.batch_stats)


def test_background_compiled_step_equals_the_jitted_step(tiny_config):
  mesh = sharding.create_mesh()
  lr = np.float32(tiny_config.train.learning_rate)
  setup, state = steps.create_train_state(tiny_config, mesh)
  want = steps.jit_train_step(setup, tiny_config)(state, _fixed_batch(), lr)
  setup, state = steps.create_train_state(tiny_config, mesh)
  step = steps.BackgroundCompiled(
      steps.jit_train_step(setup, tiny_config), setup.abstract(state),
      steps.train_batch_spec(tiny_config), jax.ShapeDtypeStruct((), np.float32))
  got = step(state, _fixed_batch(), lr)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)


def test_create_train_state_is_typed_and_sharded(tiny_config):
  mesh = sharding.create_mesh()
  seen = []

  def init_weights(model):
    seen.append(model)
    model.fc8.bias[...] = jnp.ones_like(model.fc8.bias[...])
  setup, state = steps.create_train_state(tiny_config, mesh,
                                          init_weights=init_weights)
  assert isinstance(state, steps.TrainState) and int(state.step) == 0
  assert len(seen) == 1  # the hook sees the model before it is split
  np.testing.assert_array_equal(state.params['fc8']['bias'][...], 1.0)
  # One sharding per array, and the arrays live where the shardings say.
  assert (jax.tree.structure(setup.shardings) ==
          jax.tree.structure(jax.tree.map(lambda x: 0, state)))
  jax.tree.map(lambda x, s: s.is_equivalent_to(x.sharding, x.ndim) or
               pytest.fail(f'{x.sharding} != {s}'), state, setup.shardings)
  abstract = setup.abstract(state)
  assert isinstance(abstract, steps.TrainState)
  assert abstract.params['fc6']['kernel'].shape == (
      state.params['fc6']['kernel'].shape)
  # The eval graph runs without dropout: deterministic outputs.
  ev = steps.jit_eval_step(setup, tiny_config)
  batch = dict(_fixed_batch(8), mask=jnp.ones(8, bool))
  a, b = ev(state, batch), ev(state, batch)
  assert float(a['count']) == 8 and float(a['loss']) == float(b['loss'])


def test_sharded_model_equals_create_model_bit_for_bit(tiny_config):
  # Both compile the initialiser with the same options, so a run's weights
  # do not depend on which of the two made them.
  tiny_config.model.name = 'vgg11_bn'
  sharded = steps.create_sharded_model(tiny_config, sharding.create_mesh())
  plain = steps.create_model(tiny_config)
  leaves = [jax.tree.leaves_with_path(nnx.state(m)) for m in (plain, sharded)]
  assert [p for p, _ in leaves[0]] == [p for p, _ in leaves[1]]
  for (path, a), (_, b) in zip(*leaves):
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


class _SlowFirstBatches:
  """A training iterator whose first batch takes ``first_s`` to arrive."""

  def __init__(self, first_s: float):
    self.first_s = first_s

  def __next__(self):
    time.sleep(self.first_s)
    self.first_s = 0.0
    return dict(_fixed_batch(8))


class _CompilingStep:
  """Stands for ``steps.BackgroundCompiled``: the first call waits."""

  def __init__(self, compile_s: float):
    self.compile_s, self.waited = compile_s, 0.0

  def __call__(self, state, batch, lr):
    time.sleep(self.compile_s)
    self.waited += self.compile_s
    self.compile_s = 0.0
    one = jnp.float32(1.0)
    return state, steps.TrainMetrics.single_from_model_output(
        loss=one, top1=one, top5=one), one


def test_the_first_batch_read_during_compilation_is_start_up(tiny_config):
  # The first batch is read while the step compiles in the background: its
  # wait is start-up, like the compilation's, not a data wait of training.
  trainer = object.__new__(train.Trainer)
  trainer.config, trainer.mesh = tiny_config, sharding.create_mesh()
  trainer.train_iter = _SlowFirstBatches(first_s=0.3)
  trainer.train_step = _CompilingStep(compile_s=0.4)
  trainer.lr_at = lambda step: 0.01
  trainer.plateau = types.SimpleNamespace(scale=1.0)
  trainer.state, trainer.step, trainer._pending_losses = None, 0, []
  window = steps.MetricsWindow()
  for _ in range(3):
    trainer._train_one_step(window)
  scalars = window.scalars(0.01)
  assert trainer.step == 3
  assert scalars['data_wait_fraction'] < 0.2
  # Three batches in well under the 0.7 s of start-up.
  assert scalars['images_per_sec'] > 3 * 8 / 0.3


def test_topk_correct_counts_ties_for_the_label():
  logits = jnp.array([[0.1, 0.5, 0.2, 0.0], [3.0, 1.0, 2.0, 0.0]])
  labels = jnp.array([2, 3])
  np.testing.assert_array_equal(metrics.topk_correct(logits, labels, 1),
                                [0, 0])
  np.testing.assert_array_equal(metrics.topk_correct(logits, labels, 2),
                                [1, 0])
  np.testing.assert_array_equal(metrics.topk_correct(logits, labels, 4),
                                [1, 1])
  tie = jnp.array([[1.0, 1.0, 0.0]])
  np.testing.assert_array_equal(metrics.topk_correct(tie, jnp.array([1]), 1),
                                [1])


def test_flat_hparams_are_dotted_scalars(tiny_config):
  flat = train._flat_hparams(tiny_config)  # pylint: disable=protected-access
  assert flat['train.batch_size'] == 16
  assert flat['model.name'] == 'vgg11'
  assert flat['input.eval_scales'] == '(32,)'  # non-scalars as text
  assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())


def test_bad_config_values_fail_before_any_data(tiny_config, tmp_path):
  tiny_config.model.name = 'vgg99'
  with pytest.raises(ValueError, match="Unknown model name 'vgg99'"):
    train.train_and_evaluate(tiny_config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
  tiny_config.model.name = 'vgg11'
  tiny_config.input.eval_scales = (24,)
  with pytest.raises(ValueError, match=r'Validation scale .* 24 is smaller'):
    train.train_and_evaluate(tiny_config, str(tmp_path / 'run'))


def _params(workdir, checkpoint='latest'):
  params, _, _ = weights.load_variables(str(workdir), checkpoint)
  return params


def test_end_to_end_writes_metrics_and_checkpoints(tiny_config, tmp_path,
                                                   monkeypatch):
  tiny_config.train.max_steps = 8
  tiny_config.train.eval_every_steps = 4
  tiny_config.train.plateau_patience = 2  # two validations: no drop yet
  workdir = tmp_path / 'run'
  monkeypatch.chdir(tmp_path)  # a relative workdir, as users type it
  summary = train.train_and_evaluate(tiny_config, 'run')
  assert summary['step'] == 8 and summary['stopped'] == 'done'
  assert summary['val_count'] == 40  # the whole tiny test split, once
  assert 0 <= summary['val_top1'] <= summary['val_top5'] <= 1
  assert [s for s, _ in summary['train_loss_history']] == [2, 4, 6, 8]
  assert summary['learning_rate'] == pytest.approx(0.01)
  assert (workdir / 'config.json').exists()
  steps_saved = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()
                       if p.name.isdigit())
  assert steps_saved == [4, 8]
  events = list(workdir.glob('events.out.tfevents.*'))
  assert events, 'no TensorBoard event file'
  step, meta = checkpointing.read_meta(str(workdir))
  assert step == 8 and meta['val']['val_count'] == 40
  assert meta['model']['name'] == 'vgg11' and meta['seed'] == tiny_config.seed
  assert meta['normalization'] == 'imagenet_mean_std'
  assert len(meta['class_names']) == 10 and 'plateau' in meta
  model, config, meta = weights.load_model(str(workdir))
  assert meta['step'] == 8 and config.model.name == 'vgg11'
  assert model(jnp.zeros((1, 32, 32, 3))).shape == (1, 10)


def test_resume_is_exact(tiny_config, tmp_path):
  summary = train_straight_and_split(tiny_config, tmp_path, 6, 3)
  assert summary['step'] == 6
  a, b = _params(tmp_path / 'straight'), _params(tmp_path / 'split')
  jax.tree.map(np.testing.assert_array_equal, a, b)
  c = _params(tmp_path / 'split', 3)
  assert not np.array_equal(a['fc8']['kernel'], c['fc8']['kernel'])


def test_config_mismatch_is_a_clear_error(tiny_config, net_a_copy):
  tiny_config.model.width_multiplier = 1 / 8
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r'width_multiplier: checkpoint 0.0625 vs config '
                           r'0.125'):
    train.train_and_evaluate(tiny_config, str(net_a_copy))
  assert checkpointing.read_meta(str(net_a_copy))[0] == 2  # nothing written


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_config,
                                                              net_a_copy):
  tiny_config.train.max_steps = 30
  tiny_config.train.log_every_steps = 1
  tiny_config.train.checkpoint_every_steps = 1
  tiny_config.train.learning_rate = 1e12
  with pytest.raises(train.NonFiniteLossError, match=r'at step \d+'):
    train.train_and_evaluate(tiny_config, str(net_a_copy))
  params = _params(net_a_copy)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


_LOSSES = '''
import json, sys
sys.path.insert(0, {tests!r})
from conftest import load_config
from vgg_jax import train, weights
import jax
if {procs} > 1:
  jax.distributed.initialize('localhost:{port}', num_processes={procs},
                             process_id=int(sys.argv[1]))
config = load_config('quickstart')
config.update_from_flattened_dict(json.loads({overrides!r}))
summary = train.train_and_evaluate(config, {workdir!r} + '/' + str(jax.process_count()))
params, _, _ = weights.load_variables({workdir!r} + '/' + str(jax.process_count()))
import numpy as np
print('RESULT', json.dumps(dict(devices=jax.device_count(),
      losses=[l for _, l in summary['train_loss_history']],
      val_loss=summary['val_loss'], fc8=float(np.abs(np.asarray(params['fc8']['kernel'])).sum()))))
'''


def _run_losses(tiny_config, tmp_path, devices_per_proc, procs):
  overrides = {k: tiny_config[k.split('.')[0]][k.split('.')[1]] for k in (
      'data.manual_dir', 'data.data_dir', 'data.num_workers', 'model.name',
      'model.width_multiplier', 'train.batch_size', 'train.eval_batch_size',
      'train.max_steps', 'train.learning_rate')}
  # One batch is the whole tiny split: the global batch is then the same set
  # of records whatever the process count (each process reads its own shard).
  overrides['train.batch_size'] = 160
  overrides['train.max_steps'] = 3
  overrides['train.log_every_steps'] = 1
  overrides['model.dropout_rate'] = 0.0  # masks follow batch positions
  code = _LOSSES.format(tests=str(REPO / 'tests'), procs=procs, port=0,
                        overrides=json.dumps(overrides),
                        workdir=str(tmp_path))
  env = dict(os.environ, XLA_FLAGS=(
      f'--xla_force_host_platform_device_count={devices_per_proc}'),
             JAX_PLATFORMS='cpu')
  if procs == 1:
    out = subprocess.run([sys.executable, '-c', code, '0'], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    outs = [out.stdout]
  else:
    import portpicker
    port = portpicker.pick_unused_port()
    code = code.replace("'localhost:0'", f"'localhost:{port}'")
    env['JAX_CPU_COLLECTIVES_IMPLEMENTATION'] = 'gloo'
    ps = [subprocess.Popen([sys.executable, '-c', code, str(i)], env=env,
                           cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
          for i in range(procs)]
    outs = []
    for p in ps:
      o, e = p.communicate(timeout=600)
      assert p.returncode == 0, e[-3000:]
      outs.append(o)
  line = [l for l in outs[0].splitlines() if l.startswith('RESULT')][0]
  return json.loads(line[len('RESULT'):])


@pytest.mark.slow
def test_four_devices_match_one_device(tiny_config, tmp_path):
  one = _run_losses(tiny_config, tmp_path / 'one', 1, 1)
  four = _run_losses(tiny_config, tmp_path / 'four', 4, 1)
  assert (one['devices'], four['devices']) == (1, 4)
  assert len(one['losses']) == 3
  np.testing.assert_allclose(four['losses'], one['losses'], rtol=1e-4)
  # Reductions are split differently over 1 and 4 devices: float32 rounding
  # differs in the last bits and grows a little over three SGD steps.
  assert four['val_loss'] == pytest.approx(one['val_loss'], rel=1e-3)
  assert four['fc8'] == pytest.approx(one['fc8'], rel=1e-3)


@pytest.mark.slow
def test_two_processes_match_one_process(tiny_config, tmp_path):
  one = _run_losses(tiny_config, tmp_path / 'one', 4, 1)
  two = _run_losses(tiny_config, tmp_path / 'two', 2, 2)
  assert two['devices'] == 4
  np.testing.assert_allclose(two['losses'], one['losses'], rtol=1e-4)
  assert two['val_loss'] == pytest.approx(one['val_loss'], rel=1e-3)
  assert two['fc8'] == pytest.approx(one['fc8'], rel=1e-3)
