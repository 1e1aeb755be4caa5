"""The training command line: flags, one-line user errors, SIGTERM."""

import pathlib
import signal
import subprocess
import sys
import time

import pytest

from conftest import one_error_line
from conftest import TINY_FIELDS

from vgg_jax import checkpointing
from vgg_jax import cli
from vgg_jax import main
from vgg_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]

def _args(config, workdir, extra=()):
  """main's arguments: the quickstart config with the tiny config's fields."""
  args = [f'--config={REPO}/configs/quickstart.py', f'--workdir={workdir}']
  for key in TINY_FIELDS:
    node = config
    for part in key.split('.'):
      node = node[part]
    args.append(f'--config.{key}={node}')
  return args + list(extra)


def test_bad_model_name_is_one_line_and_status_1(tiny_config, tmp_path,
                                                  capsys):
  status = cli.call(main.define_flags, main.main, _args(
      tiny_config, tmp_path / 'run', ['--config.model.name=vgg99']))
  assert status == 1
  line = one_error_line(capsys)
  assert ': error: ' in line and "Unknown model name 'vgg99'" in line


def test_checkpoint_mismatch_is_one_line_and_status_1(tiny_config,
                                                      net_a_copy, capsys):
  status = cli.call(main.define_flags, main.main, _args(
      tiny_config, net_a_copy, ['--config.model.width_multiplier=0.125']))
  assert status == 1
  line = one_error_line(capsys)
  assert 'width_multiplier: checkpoint 0.0625 vs config 0.125' in line


def test_missing_workdir_flag_is_one_line_and_status_1(capsys):
  status = cli.call(main.define_flags, main.main,
                    [f'--config={REPO}/configs/quickstart.py'])
  assert status == 1
  assert 'workdir' in one_error_line(capsys)


def test_helpfull_lists_the_flags():
  out = subprocess.run([sys.executable, '-m', 'vgg_jax.main', '--helpfull'],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  # absl exits 1 after printing the help.
  assert 'vgg_jax/main.py:' in out.stdout, out.stderr[-3000:]
  for flag in ('--config:', '--workdir:', '--multiprocess:'):
    assert flag in out.stdout
  assert 'Traceback' not in out.stderr


@pytest.mark.slow
def test_sigterm_saves_a_restorable_checkpoint(tiny_config, tmp_path):
  tiny_config.train.max_steps = 100000
  tiny_config.train.log_every_steps = 1
  workdir = tmp_path / 'run'
  proc = subprocess.Popen(
      [sys.executable, '-m', 'vgg_jax.main', *_args(tiny_config, workdir)],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = []
  deadline = time.monotonic() + 240
  for line in proc.stdout:
    lines.append(line)
    if 'step 5/' in line or time.monotonic() > deadline:
      break
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  log = ''.join(lines) + out
  assert proc.returncode == 0, log[-3000:]
  assert 'SIGTERM received' in log and 'preempted' in log
  step, meta = checkpointing.read_meta(str(workdir))
  assert step >= 5 and meta['step'] == step
  # The run resumes from there.
  tiny_config.train.max_steps = step + 2
  summary = train.train_and_evaluate(tiny_config, str(workdir))
  assert summary['step'] == step + 2
