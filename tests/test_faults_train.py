"""Faults on the training side: damaged checkpoints, a full disk, lost peers.

Each test damages or kills something and checks what a user gets: which
checkpoint a run resumes from, one error line naming the cause, a bounded
wait. ``tests/fault_suite.py`` runs these with the data-side faults and
prints the table of outcomes.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest
from PIL import Image

from conftest import make_tiny_config
from conftest import one_error_line
from conftest import TINY_FIELDS

from vgg_jax import checkpointing
from vgg_jax import cli
from vgg_jax import evaluate
from vgg_jax import main
from vgg_jax import predict
from vgg_jax import train
from vgg_jax import weights

REPO = pathlib.Path(__file__).resolve().parents[1]
# A config file for subprocesses: quickstart with the fields in FIELDS set.
_CONFIG_FILE = '''
import importlib.util
import json

FIELDS = json.loads({fields!r})

def get_config():
  spec = importlib.util.spec_from_file_location('quickstart', {quickstart!r})
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in FIELDS.items():
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config
'''


def config_file(path, config, **fields):
  """Writes a config file of ``config``'s tiny fields plus ``fields``.

  ``fields`` name config fields with ``__`` for dots (``train__max_steps``).
  """
  values = {}
  for key in TINY_FIELDS:
    section, leaf = key.split('.')
    values[key] = config[section][leaf]
  values.update({k.replace('__', '.'): v for k, v in fields.items()})
  path.write_text(_CONFIG_FILE.format(
      fields=json.dumps(values),
      quickstart=str(REPO / 'configs' / 'quickstart.py')))
  return path


def _tracebacks(text):
  return text.count('Traceback (most recent call last)')


def _error_lines(text):
  return [l for l in text.splitlines() if ': error: ' in l]


# --------------------------------------------------------------------------
# Damaged checkpoints.


@pytest.fixture(scope='module')
def two_checkpoints(tmp_path_factory, fashion_idx_dir, tfds_dir):
  """A tiny run's workdir with checkpoints at steps 2 and 4 (read-only)."""
  config = make_tiny_config(fashion_idx_dir, tfds_dir)
  config.train.max_steps = 4
  config.train.checkpoint_every_steps = 2
  workdir = tmp_path_factory.mktemp('two_checkpoints') / 'run'
  train.train_and_evaluate(config, str(workdir))
  return workdir


@pytest.fixture
def run_copy(two_checkpoints, tmp_path):
  return pathlib.Path(shutil.copytree(two_checkpoints, tmp_path / 'run'))


def _largest_array_file(workdir, step):
  state = workdir / 'checkpoints' / str(step) / 'state'
  files = [p for p in state.rglob('d/*') if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def _damage(workdir, step, how):
  """Damages checkpoint ``step``; returns the damaged file's name."""
  root = workdir / 'checkpoints' / str(step)
  if how == 'truncated array':  # the case
    path = _largest_array_file(workdir, step)
    assert path.stat().st_size > 1000
    os.truncate(path, 1000)
  elif how == 'missing array':
    path = _largest_array_file(workdir, step)
    path.unlink()
  elif how == 'missing metadata':
    path = root / 'meta' / 'metadata'
    path.unlink()
  elif how == 'unparsable metadata':
    path = root / '_CHECKPOINT_METADATA'
    path.write_text('{"item_handlers": {')
  elif how == 'unparsable iterator state':
    path = root / 'data' / 'process_0-of-1.json'
    path.write_text('not json')
  else:
    raise ValueError(how)
  return path.name


_DAMAGES = ('truncated array', 'missing array', 'missing metadata',
            'unparsable metadata', 'unparsable iterator state')


@pytest.mark.parametrize('how', _DAMAGES)
def test_find_damage_names_the_file(run_copy, how):
  assert checkpointing.find_damage(str(run_copy), 4) is None
  name = _damage(run_copy, 4, how)
  damage = checkpointing.find_damage(str(run_copy), 4)
  assert damage and name in damage, damage
  if how == 'truncated array':
    assert '1000 bytes' in damage and 'truncated' in damage
  assert checkpointing.find_damage(str(run_copy), 2) is None


def test_unfinished_saves_are_not_checkpoints(run_copy):
  (run_copy / 'checkpoints' / '6.orbax-checkpoint-tmp').mkdir()
  assert checkpointing.steps_on_disk(str(run_copy)) == [4, 2]


def _damage_log_lines(caplog, step):
  return [r.getMessage() for r in caplog.records
          if f'Checkpoint {step} in' in r.getMessage()
          and 'is damaged' in r.getMessage()]


def test_damaged_latest_falls_back_to_the_newest_intact(tiny_config, run_copy,
                                                        caplog):
  name = _damage(run_copy, 4, 'truncated array')
  tiny_config.train.max_steps = 6
  tiny_config.train.checkpoint_every_steps = 2
  tiny_config.train.log_every_steps = 1
  summary = train.train_and_evaluate(tiny_config, str(run_copy))
  # Steps 3 to 6 were trained again from checkpoint 2.
  assert [s for s, _ in summary['train_loss_history']] == [3, 4, 5, 6]
  lines = _damage_log_lines(caplog, 4)
  assert len(lines) == 1 and name in lines[0], lines  # one line, the file
  assert any('FALLING BACK to checkpoint 2' in r.getMessage()
             for r in caplog.records if r.levelname == 'WARNING')
  # The damaged one was moved aside, and step 4 saved anew.
  assert (run_copy / checkpointing.DAMAGED_DIR / '4').is_dir()
  assert checkpointing.steps_on_disk(str(run_copy)) == [6, 4, 2]
  assert checkpointing.find_damage(str(run_copy), 4) is None


def test_strict_resume_refuses_to_fall_back(tiny_config, run_copy):
  name = _damage(run_copy, 4, 'missing array')
  tiny_config.train.strict_resume = True
  tiny_config.train.max_steps = 6
  with pytest.raises(checkpointing.DamagedCheckpointError,
                     match=rf'Checkpoint 4 .* is damaged: .*{name}: missing.*'
                           'strict_resume'):
    train.train_and_evaluate(tiny_config, str(run_copy))
  assert checkpointing.steps_on_disk(str(run_copy)) == [4, 2]  # untouched


def test_every_checkpoint_damaged_is_an_error_not_a_new_run(tiny_config,
                                                            run_copy):
  _damage(run_copy, 4, 'missing metadata')
  _damage(run_copy, 2, 'truncated array')
  tiny_config.train.max_steps = 6
  with pytest.raises(checkpointing.DamagedCheckpointError,
                     match=r'Every checkpoint .* \(\[4, 2\]\) is damaged'):
    train.train_and_evaluate(tiny_config, str(run_copy))
  assert checkpointing.steps_on_disk(str(run_copy)) == [4, 2]


def test_another_models_checkpoint_stays_an_error(tiny_config, run_copy):
  tiny_config.model.width_multiplier = 1 / 8
  with pytest.raises(checkpointing.CheckpointMismatchError):
    train.train_and_evaluate(tiny_config, str(run_copy))
  assert not (run_copy / checkpointing.DAMAGED_DIR).exists()


def test_evaluate_predict_and_init_from_name_the_bad_file(
    tiny_config, run_copy, tmp_path, capsys):
  name = _damage(run_copy, 4, 'truncated array')
  status = cli.call(evaluate.define_flags, evaluate.main,
                    [f'--workdir={run_copy}', '--protocol=center_crop'])
  line = one_error_line(capsys)
  assert status == 1 and 'Checkpoint 4' in line and name in line, line
  assert 'Other checkpoints there: [2]' in line
  image = tmp_path / 'image.png'
  Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
  status = cli.call(predict.define_flags, predict.main,
                    [f'--workdir={run_copy}', str(image)], positional=True)
  line = one_error_line(capsys)
  assert status == 1 and name in line, line
  # The data behind the other arrays is fine: an older step still loads.
  assert weights.load_variables(str(run_copy), 2)[2]['step'] == 2
  args = [f'--config={config_file(tmp_path / "tiny.py", tiny_config)}',
          f'--workdir={tmp_path / "new"}',
          f'--config.train.init_from={run_copy}']
  status = cli.call(main.define_flags, main.main, args)
  line = one_error_line(capsys)
  assert status == 1 and name in line, line


# --------------------------------------------------------------------------
# One clear error from `python -m vgg_jax.main`.


def _main(config_path, workdir, *args):
  return subprocess.run(
      [sys.executable, '-m', 'vgg_jax.main', f'--config={config_path}',
       f'--workdir={workdir}', *args], cwd=REPO, capture_output=True,
      text=True, timeout=600)


@pytest.mark.slow
def test_a_non_finite_loss_isone_error_line(tiny_config, tmp_path):
  config_path = config_file(tmp_path / 'tiny.py', tiny_config,
                             train__learning_rate=1e12,
                             train__log_every_steps=1, data__num_workers=2)
  out = _main(config_path, tmp_path / 'run')
  assert out.returncode == 1, out.stderr[-3000:]
  assert _tracebacks(out.stderr) == 0, out.stderr[-3000:]
  lines = _error_lines(out.stderr)
  assert len(lines) == 1, out.stderr[-3000:]
  assert lines[0].startswith('vgg_jax.main: error: Non-finite training loss')


def test_a_damaged_checkpoint_under_strict_resume_isone_error_line(
    tiny_config, run_copy, tmp_path, capsys):
  name = _damage(run_copy, 4, 'unparsable metadata')
  config_path = config_file(tmp_path / 'tiny.py', tiny_config,
                             train__strict_resume=True)
  status = cli.call(main.define_flags, main.main,
                    [f'--config={config_path}', f'--workdir={run_copy}'])
  line = one_error_line(capsys)
  assert status == 1 and name in line and 'strict_resume' in line, line


# --------------------------------------------------------------------------
# A full disk while saving.


# `python -m vgg_jax.main` in a process whose writes past argv[1] bytes per
# file fail with EFBIG, as on a full disk (the limit is set in the child, not
# by a preexec_fn, which is unsafe in a parent with JAX's threads).
_LIMITED_MAIN = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv[0] = 'vgg_jax.main'
runpy.run_module('vgg_jax.main', run_name='__main__', alter_sys=True)
"""


@pytest.mark.slow
def test_a_full_disk_stops_with_the_step_and_keeps_the_last_checkpoint(
    tiny_config, run_copy, tmp_path):
  # The checkpoints hold ~0.5 MB array files: every save fails past 200 kB,
  # while the rest (logs, TensorBoard events) stays below it.
  config_path = config_file(tmp_path / 'tiny.py', tiny_config,
                             train__max_steps=6)
  out = subprocess.run(
      [sys.executable, '-c', _LIMITED_MAIN, '200000',
       f'--config={config_path}', f'--workdir={run_copy}'], cwd=REPO,
      capture_output=True, text=True, timeout=600)
  assert out.returncode == 1, out.stderr[-3000:]
  lines = _error_lines(out.stderr)
  assert len(lines) == 1, out.stderr[-3000:]
  assert 'Saving checkpoint 6' in lines[0], lines[0]
  assert 'File too large' in lines[0], lines[0]
  assert 'newest complete checkpoint is 4' in lines[0], lines[0]
  assert checkpointing.steps_on_disk(str(run_copy)) == [4, 2]
  assert checkpointing.find_damage(str(run_copy), 4) is None
  # Space again: the rerun resumes from checkpoint 4.
  tiny_config.train.max_steps = 6
  tiny_config.train.log_every_steps = 1
  summary = train.train_and_evaluate(tiny_config, str(run_copy))
  assert [s for s, _ in summary['train_loss_history']] == [5, 6]
  assert checkpointing.steps_on_disk(str(run_copy))[0] == 6


# --------------------------------------------------------------------------
# Two processes: one dies, or never arrives.

_PEER_TIMEOUT_S = 10
# Start-up, a first checkpoint and the wait, on a loaded 2-core machine.
_MARGIN_S = 30


def _start_process(config_path, workdir, port, process_id, *args):
  env = dict(os.environ, VGG_JAX_COORDINATOR=f'localhost:{port}',
             VGG_JAX_NUM_PROCESSES='2', VGG_JAX_PROCESS_ID=str(process_id),
             JAX_PLATFORMS='cpu', JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo',
             XLA_FLAGS='--xla_force_host_platform_device_count=1')
  log = open(workdir.parent / f'process{process_id}.log', 'w')
  process = subprocess.Popen(
      [sys.executable, '-m', 'vgg_jax.main', f'--config={config_path}',
       f'--workdir={workdir}', *args], cwd=REPO, env=env, stdout=log,
      stderr=subprocess.STDOUT, text=True)
  log.close()
  return process


def _log(workdir, process_id):
  return (workdir.parent / f'process{process_id}.log').read_text()


def _wait(process, timeout):
  try:
    return process.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    process.wait()
    return None


@pytest.mark.slow
def test_a_killed_peer_ends_the_other_within_the_timeout(tiny_config,
                                                         tmp_path):
  config_path = config_file(
      tmp_path / 'tiny.py', tiny_config, train__max_steps=100_000,
      train__checkpoint_every_steps=2, train__log_every_steps=1,
      train__peer_timeout_s=_PEER_TIMEOUT_S)
  workdir = tmp_path / 'run'
  port = portpicker.pick_unused_port()
  procs = [_start_process(config_path, workdir, port, i) for i in (0, 1)]
  try:
    deadline = time.monotonic() + 300
    while not checkpointing.steps_on_disk(str(workdir)):
      assert time.monotonic() < deadline, _log(workdir, 0)[-3000:]
      assert all(p.poll() is None for p in procs), _log(workdir, 0)[-3000:]
      time.sleep(0.5)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    status = _wait(procs[0], _PEER_TIMEOUT_S + _MARGIN_S)
    waited = time.monotonic() - killed
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  log = _log(workdir, 0)
  assert status == 1, (status, log[-3000:])
  assert waited < _PEER_TIMEOUT_S + _MARGIN_S
  lines = _error_lines(log)
  assert len(lines) == 1 and 'process 1 of 2' in lines[0], log[-3000:]
  assert 'train.peer_timeout_s' in lines[0]
  assert _tracebacks(log) == 0, log[-3000:]
  # Both processes again: they resume from the newest checkpoint.
  newest = checkpointing.steps_on_disk(str(workdir))[0]
  port = portpicker.pick_unused_port()
  procs = [_start_process(config_path, workdir, port, i,
                          f'--config.train.max_steps={newest + 2}')
           for i in (0, 1)]
  statuses = [_wait(p, 400) for p in procs]
  assert statuses == [0, 0], _log(workdir, 0)[-3000:]
  assert f'at step {newest}.' in _log(workdir, 0)
  assert checkpointing.steps_on_disk(str(workdir))[0] == newest + 2


def test_a_peer_that_never_arrives_ends_the_other_within_the_timeout(
    tiny_config, tmp_path):
  config_path = config_file(tmp_path / 'tiny.py', tiny_config,
                             train__peer_timeout_s=5)
  workdir = tmp_path / 'run'
  process = _start_process(config_path, workdir,
                           portpicker.pick_unused_port(), 0)
  status = _wait(process, 5 + 120)  # imports take most of it
  log = _log(workdir, 0)
  assert status == 1, (status, log[-3000:])
  lines = _error_lines(log)
  assert len(lines) == 1 and 'Not all processes' in lines[0], log[-3000:]
  assert 'peer_timeout_s=5' in lines[0]
  assert not workdir.exists()  # nothing written
