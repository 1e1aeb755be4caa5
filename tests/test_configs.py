"""The paper's stage configs (configs/*.py) and the refusal of a bad start."""

import pathlib
import re

from absl import flags
from ml_collections import config_flags
import pytest

from vgg_jax import architectures
from vgg_jax import recipe
from vgg_jax.configs import base

REPO = pathlib.Path(__file__).resolve().parents[1]
# The paper's stages (Sec. 3.1), transcribed independently of configs/base.py:
# (S_min, S_max, validation Q, learning rate).
PAPER_STAGES = {'s256': (256, 256, 256, 1e-2),
                's384': (384, 384, 384, 1e-3),
                'jitter': (256, 512, 384, 1e-3)}
PAPER_NETS = {'vgg11': 'A', 'vgg11_lrn': 'A-LRN', 'vgg13': 'B',
              'vgg13_5x5': 'B-5x5', 'vgg16_c': 'C', 'vgg16': 'D',
              'vgg19': 'E'}


def _load(argument, *overrides):
  """The config ``--config=ARGUMENT`` gives, parsed by config_flags."""
  flag_values = flags.FlagValues()
  argv = ['prog', f'--config={argument}', *overrides]
  config_flags.DEFINE_config_file('config', None, 'test',
                                  flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


@pytest.mark.parametrize('stage', [None, *PAPER_STAGES])
@pytest.mark.parametrize('net', sorted(PAPER_NETS))
def test_each_stage_loads_with_the_papers_fields(net, stage):
  argument = f'{REPO}/configs/{net}.py' + (f':{stage}' if stage else '')
  config = _load(argument)
  s_min, s_max, q, lr = PAPER_STAGES[stage or 's256']
  assert config.model.name == net
  assert (config.input.scale_min, config.input.scale_max) == (s_min, s_max)
  assert tuple(config.input.eval_scales) == (q,)
  assert config.train.learning_rate == pytest.approx(lr)
  assert config.input.crop_size == 224 and config.model.fc6_kernel == 7
  # Sec. 3.1: std 0.01 (the 5x5 net cannot take net A's 3x3 convs: Glorot).
  assert config.model.init == ('glorot' if net == 'vgg13_5x5' else 'normal')
  assert config.train.init_from == ''  # a run path, given per stage
  assert (config.train.batch_size, config.train.momentum,
          config.train.weight_decay) == (256, 0.9, 5e-4)
  assert config.train.schedule == 'plateau'


def test_overrides_apply_on_top_of_a_stage():
  config = _load(f'{REPO}/configs/vgg16.py:s384',
                 '--config.train.init_from=/runs/vgg16_s256',
                 '--config.train.batch_size=128')
  assert config.train.init_from == '/runs/vgg16_s256'
  assert config.train.batch_size == 128 and config.input.scale_min == 384


def test_unknown_stage_names_the_valid_ones():
  with pytest.raises(ValueError, match='s256, s384, jitter'):
    base.paper_stage('vgg16', 's512')
  with pytest.raises(Exception, match='s256, s384, jitter'):
    _load(f'{REPO}/configs/vgg19.py:s512')


def test_stage_scales_follow_the_crop():
  # Table 4's test scales at 224 px crops, the same ratios at 32 px.
  assert base.stage_scales('s256').multi_scales == (224, 256, 288)
  assert base.stage_scales('jitter').multi_scales == (256, 384, 512)
  small = base.stage_scales('jitter', 32)
  assert (small.scale_min, small.scale_max, small.test_scale) == (37, 73, 55)
  assert base.stage_scales('s256', 32).multi_scales[0] >= 32  # never < crop


def _docstring_numbers(text):
  return set(re.findall(r'\d+\.\d', text))


@pytest.mark.parametrize('net', sorted(PAPER_NETS))
def test_docstring_gives_each_stages_command_and_paper_numbers(net):
  source = (REPO / 'configs' / f'{net}.py').read_text()
  doc = source.split('"""')[1]
  assert f'python -m vgg_jax.recipe --net={net}' in doc
  for stage in PAPER_STAGES:
    assert f'--config=configs/{net}.py:{stage}' in doc
  if recipe.needs_net_a(net):
    assert '--config.train.init_from=$ROOT/vgg11' in doc
  expected = {f'{e:.1f}' for (n, _, _, _), errors in recipe.PAPER_ERRORS.items()
              if n == net for e in errors}
  assert expected <= _docstring_numbers(doc), (net, expected)


def test_quickstart_keeps_its_fields():
  config = _load(f'{REPO}/configs/quickstart.py')
  assert config.model.name == 'vgg11_bn' and config.input.crop_size == 32
  assert (config.input.scale_min, config.input.scale_max) == (32, 36)
  assert tuple(config.input.eval_scales) == (32,)


@pytest.mark.parametrize('net', ['vgg13', 'vgg16_c', 'vgg16', 'vgg19',
                                 'vgg13_5x5'])
def test_deeper_net_from_std_001_alone_is_refused(net):
  with pytest.raises(ValueError) as e:
    architectures.check_initialisation(net, 'normal', '')
  message = str(e.value)
  assert '--config.model.init=glorot' in message
  assert '--config.train.init_from=' in message and net in message
  if net != 'vgg13_5x5':
    assert '--config.train.init_from=<a net-A workdir>' in message


@pytest.mark.parametrize('name, init, init_from', [
    ('vgg11', 'normal', ''), ('vgg11_lrn', 'normal', ''),
    ('vgg16_bn', 'normal', ''), ('vgg13_5x5_bn', 'normal', ''),
    ('vgg16', 'glorot', ''), ('vgg19', 'he', ''),
    ('vgg16', 'normal', '/runs/vgg11'), ('vgg13_5x5', 'normal', '/runs/x')])
def test_allowed_starts_pass(name, init, init_from):
  architectures.check_initialisation(name, init, init_from)


def test_check_initialisation_rejects_unknown_names():
  with pytest.raises(ValueError, match='Unknown model name'):
    architectures.check_initialisation('vgg99', 'normal', '')
