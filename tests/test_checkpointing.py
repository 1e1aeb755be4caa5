"""Checkpoints of training runs: layout, compatibility, typed and old states."""

import jax
import ml_collections
import numpy as np
import pytest

from vgg_jax import checkpoint_damage
from vgg_jax import checkpointing
from vgg_jax import sharding
from vgg_jax import steps


def _model_config(**fields):
  return ml_collections.ConfigDict(dict(model=dict(
      name='vgg11', num_classes=10, width_multiplier=0.0625, fc6_kernel=1,
      dropout_rate=0.25, init='he', dtype='float32', param_dtype='float32',
      **fields)))


def test_check_compatible_lists_every_shape_relevant_difference():
  config = _model_config()
  saved = dict(config.model)
  checkpointing.check_compatible(saved, config, 'w')
  # Options that do not change shapes may differ; missing fields default
  # (older checkpoints have no in_channels).
  saved.update(dropout_rate=0.5, init='normal')
  saved.pop('in_channels', None)
  checkpointing.check_compatible(saved, config, 'w')
  saved.update(name='vgg13', fc6_kernel=7)
  with pytest.raises(checkpointing.CheckpointMismatchError) as e:
    checkpointing.check_compatible(saved, config, 'w')
  assert "name: checkpoint 'vgg13' vs config 'vgg11'" in str(e.value)
  assert 'fc6_kernel: checkpoint 7 vs config 1' in str(e.value)
  assert 'The checkpoint in w' in str(e.value)
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match='in_channels: checkpoint 3 vs config 1'):
    checkpointing.check_compatible(dict(config.model),
                                   _model_config(in_channels=1), 'w')


def test_read_config_of_a_non_workdir_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError,
                     match='is not a vgg_jax training workdir'):
    checkpointing.read_config(str(tmp_path))


def test_read_meta_resolves_latest_best_and_steps(net_a_run):
  for which in ('latest', 'best', 2, '2'):
    step, meta = checkpointing.read_meta(str(net_a_run), which)
    assert step == 2 and meta['step'] == 2
  with pytest.raises(ValueError, match="Bad checkpoint 'newest'"):
    checkpointing.read_meta(str(net_a_run), 'newest')
  with pytest.raises(FileNotFoundError, match=r'available: \[2\]'):
    checkpointing.read_meta(str(net_a_run), 5)


def test_train_state_and_the_old_dict_layout_restore_alike(tiny_config,
                                                           tmp_path):
  setup, state = steps.create_train_state(tiny_config,
                                          sharding.create_mesh())
  old = dict(step=state.step, params=state.params,
             batch_stats=state.batch_stats, opt_state=state.opt_state)
  for name, saved in (('typed', state), ('dict', old)):
    manager = checkpointing.create_manager(str(tmp_path / name), tiny_config)
    manager.save(1, args=checkpointing.save_args(saved, {'step': 1}, None))
    manager.wait_until_finished()
    restored = manager.restore(1, args=checkpointing.restore_args(
        setup.abstract(state), None))
    manager.close()
    assert isinstance(restored['state'], steps.TrainState), name
    assert restored['meta'] == {'step': 1}
    jax.tree.map(np.testing.assert_array_equal, restored['state'], state)
    raw = checkpointing.read_state(str(tmp_path / name), 1)
    assert set(raw) == {'step', 'params', 'batch_stats', 'opt_state'}, name


def test_error_summary_is_the_innermost_cause_on_one_line():
  try:
    try:
      raise OSError('Failed writing "a/b":\n' + 'x' * 2000 +
                    ' File too large [os_error_code=27]')
    except OSError as inner:
      raise ValueError('outer') from inner
  except ValueError as e:
    summary = checkpoint_damage.error_summary(e)
  assert '\n' not in summary and len(summary) < 800
  assert summary.startswith('Failed writing "a/b":')
  assert summary.endswith('File too large [os_error_code=27]')


def test_read_meta_names_a_damaged_file(net_a_copy):
  (net_a_copy / 'checkpoints' / '2' / 'meta' / 'metadata').write_text('{')
  with pytest.raises(checkpointing.DamagedCheckpointError,
                     match=r'Checkpoint 2 in .* is damaged: meta/metadata: '
                           r'unparsable .* Other checkpoints there: none'):
    checkpointing.read_meta(str(net_a_copy))
