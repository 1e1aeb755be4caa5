"""Fine-tuning: init_from across num_classes and trunk-only weights, layer
choice, freezing, the new-layer learning-rate multiplier, input normalisation
from the weights, and the fine-tuning recipe."""

import functools
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import accelerator_convs
from conftest import load_config
from conftest import make_tiny_config
from conftest import REPO
from conftest import train_straight_and_split
from vgg_jax import checkpointing
from vgg_jax import finetune
from vgg_jax import models
from vgg_jax import preprocessing
from vgg_jax import pretrained
from vgg_jax import sharding
from vgg_jax import steps
from vgg_jax import train
from vgg_jax import trees
from vgg_jax import weights

_WEIGHTS = nnx.Any(nnx.Param, nnx.BatchStat)
NET_A_CONVS = ['blocks.0.convs.0', 'blocks.1.convs.0', 'blocks.2.convs.0',
               'blocks.2.convs.1', 'blocks.3.convs.0', 'blocks.3.convs.1',
               'blocks.4.convs.0', 'blocks.4.convs.1']


def _options(config, **overrides):
  return dict(models.ModelOptions.from_config(config.model).as_dict(),
              **overrides)


def _model(config, seed=0):
  return models.create_model(config.model.name, rngs=seed,
                             **_options(config))


def _abstract(config):
  """Shapes only: enough for init_from's checks, which precede any copy."""
  return models.abstract_model(config.model.name, **_options(config))


@pytest.fixture(scope='module')
def net_a_model(fashion_idx_dir, tfds_dir):
  """A fresh tiny net A of the tiny config; tests change ``nnx.clone``s."""
  return _model(make_tiny_config(fashion_idx_dir, tfds_dir))


def _flat(model_or_state):
  state = (nnx.state(model_or_state, _WEIGHTS)
           if isinstance(model_or_state, nnx.Module) else model_or_state)
  return {k: np.asarray(v)
          for k, v in trees.flatten(nnx.to_pure_dict(state)).items()}


def _save_pretrained(path, config, *, name=None, include_top=True,
                     normalization='imagenet_mean_std', mean_rgb=None,
                     **overrides):
  """A tiny pretrained dir of random NumPy weights (no model is built)."""
  name = name or config.model.name
  options = _options(config, **overrides)
  rng = np.random.RandomState(7)
  flat = {k: (rng.rand(*shape) + 0.5 if k[-1] == 'var' else
              rng.normal(0.1, 0.05, shape)).astype(dtype)
          for k, (shape, dtype) in pretrained.expected_shapes(
              name, include_top=include_top, **options).items()}
  meta = pretrained.make_metadata(name, normalization=normalization,
                                  mean_rgb=mean_rgb, include_top=include_top,
                                  **options)
  pretrained.save_pretrained(path, trees.unflatten(flat), meta)
  return str(path), flat


def _by_layer(flat, layers):
  return {k: v for k, v in flat.items() if finetune.layer_of(k) in layers}


def _assert_same(got, want, layers):
  for k, v in _by_layer(want, layers).items():
    np.testing.assert_array_equal(got[k], v, err_msg=str(k))


def _assert_all_differ(got, want, layers):
  for k in _by_layer(want, layers):
    if k[-1] == 'kernel':
      assert not np.array_equal(got[k], want[k]), k


# --------------------------------------------------------------------------
# init_from


def test_num_classes_change_copies_all_but_fc8_and_logs_it(
    tiny_config, net_a_run, caplog):
  src = _flat_state_of_run(net_a_run)
  tiny_config.model.num_classes = 5
  tiny_config.train.init_from = str(net_a_run)
  model = _model(tiny_config)
  fresh = _flat(model)
  with caplog.at_level(logging.INFO):
    copied = weights.init_from(model, tiny_config)
  assert copied == NET_A_CONVS + ['fc6', 'fc7']
  got = _flat(model)
  _assert_same(got, src, copied)
  _assert_same(got, fresh, ['fc8'])  # random, the model's own
  assert got[('fc8', 'kernel')].shape[-1] == 5
  assert ('copied conv1_1, conv2_1, conv3_1, conv3_2, conv4_1, conv4_2, '
          'conv5_1, conv5_2, fc6, fc7; new (random init): fc8.') in caplog.text


def _flat_state_of_run(workdir):
  params, stats, _ = weights.load_variables(str(workdir))
  return {**trees.flatten(params), **trees.flatten(stats)}


def test_trunk_only_dir_gives_a_new_head_and_copies_bn(tiny_config,
                                                       tmp_path, caplog):
  tiny_config.model.name = 'vgg11_bn'
  path, src = _save_pretrained(tmp_path / 'trunk', tiny_config,
                               include_top=False)
  tiny_config.model.num_classes = 5
  tiny_config.train.init_from = path
  model = _model(tiny_config)
  fresh = _flat(model)
  with caplog.at_level(logging.INFO):
    copied = weights.init_from(model, tiny_config)
  assert copied == NET_A_CONVS
  got = _flat(model)
  _assert_same(got, src, copied)  # BN scale, bias, mean and var included
  assert any(k[2] == 'norms' and k[-1] == 'mean' for k in src)
  _assert_same(got, fresh, finetune.HEAD_LAYERS)
  assert 'new (random init): fc6, fc7, fc8.' in caplog.text


@pytest.mark.parametrize('init_layers, want', [
    ('trunk', NET_A_CONVS),
    ('trunk,fc6', NET_A_CONVS + ['fc6']),
    ('conv1_1,fc7,blocks.4.convs.1',
     ['blocks.0.convs.0', 'blocks.4.convs.1', 'fc7']),
    ('head', ['fc6', 'fc7', 'fc8']),
])
def test_init_layers_chooses_what_is_copied(tiny_config, net_a_run,
                                            net_a_model, init_layers, want):
  src = _flat_state_of_run(net_a_run)
  tiny_config.train.init_from = str(net_a_run)
  tiny_config.train.init_layers = init_layers
  model = nnx.clone(net_a_model)
  fresh = _flat(model)
  assert weights.init_from(model, tiny_config) == want
  got = _flat(model)
  _assert_same(got, src, want)
  others = [l for l in finetune.layers_of(got) if l not in want]
  _assert_same(got, fresh, others)


@pytest.mark.parametrize('init_layers, message', [
    ('conv9_9', r"unknown layer 'conv9_9'; valid: matching, trunk"),
    ('trunk,fc8', r'fc8.kernel has shape \(1, 1, 256, 10\), the model '
                  r'wants \(1, 1, 256, 5\)'),
])
def test_init_layers_errors_name_the_layer(tiny_config, net_a_run,
                                           init_layers, message):
  tiny_config.model.num_classes = 5
  tiny_config.train.init_from = str(net_a_run)
  tiny_config.train.init_layers = init_layers
  with pytest.raises(checkpointing.CheckpointMismatchError, match=message):
    weights.init_from(_abstract(tiny_config), tiny_config)


def test_net_a_gives_a_deeper_net_only_its_four_convs(tiny_config,
                                                      net_a_run):
  tiny_config.model.name = 'vgg16'
  tiny_config.train.init_from = str(net_a_run)
  tiny_config.train.init_layers = 'conv4_1'
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r'blocks.3.convs.0 \(conv4_1\) cannot be copied'):
    weights.init_from(_abstract(tiny_config), tiny_config)
  tiny_config.train.init_layers = 'trunk'
  assert weights.init_from(_model(tiny_config), tiny_config) == (
      NET_A_CONVS[:4])


def test_another_architecture_names_the_layers_and_leaves_the_model(
    tiny_config, tmp_path):
  tiny_config.model.name = 'vgg16'
  tiny_config.train.init_from, _ = _save_pretrained(
      tmp_path / 'pre', tiny_config, name='vgg13')
  model = _model(tiny_config)
  before = _flat(model)
  # The layers vgg16 has and vgg13 lacks are named.
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r'holds vgg13; .*Layers that differ: '
                           r'blocks.2.convs.2 is missing; blocks.3.convs.2 '
                           r'is missing; blocks.4.convs.2 is missing\.'):
    weights.init_from(model, tiny_config)
  after = _flat(model)
  assert before.keys() == after.keys()
  for k, v in before.items():
    np.testing.assert_array_equal(after[k], v)


@pytest.mark.parametrize('overrides, message', [
    # The same net at another width: every trunk layer differs.
    (dict(width_multiplier=1 / 8),
     r'blocks.0.convs.0.kernel has shape \(3, 3, 3, 8\), the model wants '
     r'\(3, 3, 3, 4\)'),
    # Another fc6_kernel (crop size): FC-6 differs, which 'matching' refuses.
    (dict(fc6_kernel=2),
     r'fc6.kernel has shape \(2, 2, 32, 256\), the model wants '
     r'\(1, 1, 32, 256\).*train.init_layers chooses'),
])
def test_other_differences_of_the_same_net_are_errors(tiny_config, tmp_path,
                                                      overrides, message):
  tiny_config.train.init_from, _ = _save_pretrained(
      tmp_path / 'pre', tiny_config, **overrides)
  with pytest.raises(checkpointing.CheckpointMismatchError, match=message):
    weights.init_from(_abstract(tiny_config), tiny_config)


def test_plan_copy_of_a_source_without_fc8_leaves_fc8_new():
  target = {('blocks', 0, 'convs', 0, 'kernel'): (3, 3, 3, 4),
            ('fc6', 'kernel'): (1, 1, 4, 8), ('fc8', 'kernel'): (1, 1, 8, 5)}
  source = dict(target)
  source[('fc8', 'kernel')] = (1, 1, 8, 10)
  plan = finetune.plan_copy(source, target, ['blocks.0.convs.0', 'fc6',
                                             'fc8'])
  assert plan.copy == ('blocks.0.convs.0', 'fc6') and plan.new == ('fc8',)
  assert not plan.problems
  # A trunk layer missing from the source is never silently left new.
  del source[('blocks', 0, 'convs', 0, 'kernel')]
  plan = finetune.plan_copy(source, target, ['blocks.0.convs.0', 'fc6'])
  assert plan.problems == ('blocks.0.convs.0 is missing',)


# --------------------------------------------------------------------------
# Freezing and the learning-rate multiplier, on the step itself.


def _batch(n=8, seed=0):
  rng = np.random.RandomState(seed)
  return dict(image=jnp.asarray(rng.randint(0, 255, (n, 32, 32, 3)),
                                jnp.uint8),
              label=jnp.asarray(rng.randint(0, 10, n), jnp.int32))


def _train(config, num_steps=3, init_weights=None):
  setup, state = steps.create_train_state(config, sharding.create_mesh(),
                                          init_weights=init_weights)
  before = (_flat(state.params), _flat(state.batch_stats))
  step = steps.jit_train_step(setup, config)
  for _ in range(num_steps):
    state, _, _ = step(state, _batch(), jnp.float32(0.05))
  return setup, state, before, (_flat(state.params), _flat(state.batch_stats))


@pytest.mark.parametrize('freeze, trained', [
    ('trunk', ['fc6', 'fc7', 'fc8']),
    ('all_but_fc8', ['fc8']),
])
def test_frozen_layers_and_their_bn_statistics_stay_bit_identical(
    tiny_config, freeze, trained):
  tiny_config.model.name = 'vgg11_bn'
  tiny_config.train.freeze = freeze
  _, state, (params0, stats0), (params, stats) = _train(tiny_config)
  frozen = [l for l in finetune.layers_of(params0) if l not in trained]
  _assert_same(params, params0, frozen)
  _assert_same(stats, stats0, frozen)  # BN uses its running statistics
  _assert_all_differ(params, params0, trained)
  # Optimiser state (momentum) for the trainable parameters only.
  momentum = _flat(state.opt_state[1].trace)
  assert {finetune.layer_of(k) for k in momentum} == set(trained)


def _step_convs(config):
  setup, state = steps.create_train_state(config, sharding.create_mesh())
  step = steps.make_train_step(setup.graphdef, setup.rest, setup.tx,
                               lambda x: x.astype(jnp.float32), config.seed,
                               setup.trainable)
  return accelerator_convs(step, state, _batch(), jnp.float32(0.01))


def test_frozen_trunk_step_has_no_backward_convs_in_the_trunk(tiny_config):
  # Net A: 8 trunk convs and 3 head convs (FC-6..8 are convs), forward.
  forward = 8 + 3
  assert _step_convs(tiny_config) == forward + 11 + 10  # kernel + input grads
  tiny_config.train.freeze = 'trunk'
  # Kernel gradients of FC-6..8, input gradients of FC-7 and FC-8 only.
  assert _step_convs(tiny_config) == forward + 3 + 2


@pytest.mark.parametrize('freeze, message', [
    ('all', 'would freeze every layer and leave nothing to train'),
    ('conv', "Unknown train.freeze 'conv'; valid: none, trunk, all_but_fc8"),
])
def test_bad_freeze_is_an_error(tiny_config, freeze, message):
  tiny_config.train.freeze = freeze
  with pytest.raises(ValueError, match=message):
    steps.create_train_state(tiny_config, sharding.create_mesh())


def test_lr_multiplier_scales_the_first_update_of_new_layers(tiny_config,
                                                             net_a_run):
  tiny_config.model.num_classes = 5  # FC-8 is new
  tiny_config.train.init_from = str(net_a_run)
  tiny_config.train.new_layers_lr_mult = 10.0
  init = functools.partial(weights.init_from, config=tiny_config)
  _, state, (p0, _), (p1, _) = _train(tiny_config, num_steps=1,
                                      init_weights=init)
  # The momentum buffer after one step is the unscaled update g + decay,
  # so every layer moved by lr x that, FC-8 by 10 x lr x that.
  (_, trace), scale_state = state.opt_state
  trace = _flat(trace.trace)
  for k, v in p0.items():
    mult = 10.0 if k[0] == 'fc8' else 1.0
    np.testing.assert_allclose(p1[k], v - np.float32(0.05 * mult) * trace[k],
                               rtol=1e-6, atol=1e-8, err_msg=str(k))
    if k[-1] == 'kernel':
      assert np.abs(trace[k]).max() > 0, k
  scales = {k: float(v) for k, v in _flat(scale_state.scales).items()}
  assert scales == {k: 10.0 if k[0] == 'fc8' else 1.0 for k in p0}


def test_lr_multiplier_must_be_positive(tiny_config):
  tiny_config.train.new_layers_lr_mult = 0.0
  with pytest.raises(ValueError, match='new_layers_lr_mult 0.0: must be > 0'):
    steps.create_optimizer(tiny_config, {})


# --------------------------------------------------------------------------
# Input normalisation from the weights.


def _recorded(normalization, mean_rgb=None):
  return dict(normalization=normalization, mean_rgb=mean_rgb)


def test_normalisation_from_the_weights_when_the_config_sets_none(caplog):
  config = load_config('finetune')  # leaves the base default
  with caplog.at_level(logging.INFO):
    got = finetune.source_normalization(config, _recorded('caffe_bgr'),
                                        'weights/x')
  assert got.input.normalization == 'caffe_bgr'
  assert config.input.normalization == 'mean_rgb'  # the caller's untouched
  assert ('Input normalisation caffe_bgr (BGR) from weights/x (the config '
          'does not set one).') in caplog.text
  mean = [100.0, 110.0, 120.0]
  got = finetune.source_normalization(config, _recorded('mean_rgb', mean),
                                      'weights/x')
  assert got.input.mean_rgb == tuple(mean)


def test_an_explicit_conflicting_normalisation_is_kept_with_a_warning(
    tiny_config, caplog):
  # The quickstart config sets imagenet_mean_std itself.
  with caplog.at_level(logging.INFO):
    got = finetune.source_normalization(tiny_config, _recorded('caffe_bgr'),
                                        'weights/x')
  assert got is tiny_config
  warning = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert ('the config sets imagenet_mean_std (RGB) but the weights in '
          'weights/x expect caffe_bgr (BGR)') in warning[0].getMessage()
  caplog.clear()
  with caplog.at_level(logging.INFO):
    finetune.source_normalization(tiny_config,
                                  _recorded('imagenet_mean_std'), 'w')
  assert "imagenet_mean_std (RGB): the config's, as w expects" in caplog.text
  config = load_config('finetune')
  config.input.normalization_from_init = False
  assert finetune.source_normalization(
      config, _recorded('caffe_bgr'), 'w').input.normalization == 'mean_rgb'


# --------------------------------------------------------------------------
# End to end: a run from a pretrained dir with a new FC-8, frozen trunk, x10.


def _run_params(workdir, step=None):
  params, _, _ = weights.load_variables(str(workdir),
                                        'latest' if step is None else step)
  return trees.flatten(params)


@pytest.mark.slow  # three short training runs
def test_finetune_run_freezes_resumes_exactly_and_records_the_input(
    tiny_config, tmp_path):
  path, src = _save_pretrained(tmp_path / 'pre', tiny_config,
                               num_classes=5, normalization='caffe_bgr')
  tiny_config.input.normalization = 'mean_rgb'  # the base default: not set
  tiny_config.train.init_from = path
  tiny_config.train.freeze = 'trunk'
  tiny_config.train.new_layers_lr_mult = 10.0
  summary = train_straight_and_split(tiny_config, tmp_path, 4, 2)
  assert summary['step'] == 4
  a, b = _run_params(tmp_path / 'straight'), _run_params(tmp_path / 'split')
  for k, v in a.items():
    np.testing.assert_array_equal(b[k], v, err_msg=str(k))
  trunk = [l for l in finetune.layers_of(a) if l not in finetune.HEAD_LAYERS]
  _assert_same(a, src, trunk)  # frozen: still the pretrained weights
  _assert_all_differ(a, src, ['fc6', 'fc7'])
  saved = json.loads((tmp_path / 'split' / 'config.json').read_text())
  assert saved['input']['normalization'] == 'caffe_bgr'
  assert checkpointing.read_meta(str(tmp_path / 'split'))[1][
      'normalization'] == 'caffe_bgr'


# --------------------------------------------------------------------------
# The recipe.


def test_finetune_recipe_is_a_valid_image_folder_fine_tune():
  config = load_config('finetune')
  assert config.data.dataset == 'image_folder'
  assert config.train.learning_rate == 1e-3
  assert config.train.schedule == 'step'
  assert config.train.freeze == 'none'
  assert config.train.init_layers == 'matching'
  assert (config.input.normalization, tuple(config.input.mean_rgb)) == (
      'mean_rgb', preprocessing.IMAGENET_MEAN_RGB)  # so the weights' is used
  assert config.input.crop_size == 224 and config.model.fc6_kernel == 7
  assert (config.input.scale_min, config.input.scale_max) == (256, 384)
  preprocessing.check_scale(config.input.eval_scales[0],
                            config.input.crop_size, 'eval')
  doc = (REPO / 'configs' / 'finetune.py').read_text()
  for command in (
      'python -m vgg_jax.convert --source=torchvision --model=vgg16 '
      '--input=vgg16-397923af.pth --output=weights/vgg16_tv',
      '--config.train.init_from=weights/vgg16_tv',
      '--config.data.manual_dir=/data/my_images',
      '--config.model.num_classes=5',
      'python -m vgg_jax.predict --workdir='):
    assert command in doc, command
