"""Faults on the data side: dying parents, failing workers, killed preparation.

Every test runs the fault in a subprocess (a small script fed to ``python
-c``) and looks at what is left: processes, files, stderr.
"""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import alive, descendants

from vgg_jax import datasets

REPO = pathlib.Path(__file__).resolve().parents[1]

# Builds the tiny config: argv = manual_dir, data_dir, then the script's own.
_CONFIG = """
import os, sys
from vgg_jax.configs import base

def tiny_config():
  config = base.get_config()
  config.data.dataset = 'fashion_mnist'
  config.data.manual_dir, config.data.data_dir = sys.argv[1], sys.argv[2]
  config.data.train_split, config.data.eval_split = 'train', 'test'
  config.data.num_workers = 2
  config.input.scale_min, config.input.scale_max = 32, 36
  config.input.crop_size = 32
  config.train.batch_size = 16
  config.train.eval_batch_size = 8
  return config
"""

# Starts a training iterator and, with argv[4] == 'eval', an evaluation one,
# two workers each; prints READY, then waits for a signal, raises, or ends
# normally (argv[3]).
_ITERATE = _CONFIG + """
import faulthandler, signal, time
# SIGUSR1 prints every thread's stack: what a hung exit waits on.
faulthandler.register(signal.SIGUSR1, all_threads=True)
from vgg_jax import input_pipeline

config = tiny_config()
iterators = [input_pipeline.create_train_iterator(config)]
if sys.argv[4] == 'eval':
  iterators.append(input_pipeline.create_eval_iterator(config, scale=32,
                                                       mode='center_crop'))
for iterator in iterators:
  for _ in range(config.data.num_workers):  # a batch from every worker:
    next(iterator)                          # all of them have started
print('READY', flush=True)
if sys.argv[3] == 'wait':
  time.sleep(600)
elif sys.argv[3] == 'raise':
  raise RuntimeError('failure in the main process')
"""


def _default_sigint():
  # As from a terminal: a test run can leave SIGINT ignored in this process
  # (children inherit SIG_IGN, and Python then installs no Ctrl-C handler).
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(script, *args, **kwargs):
  return subprocess.Popen(
      [sys.executable, '-c', script, *map(str, args)], cwd=REPO,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      preexec_fn=_default_sigint, **kwargs)


def _wait_for(process, word):
  """Reads the child's stdout up to a line ``word``."""
  for line in process.stdout:
    if line.strip() == word:
      return
  pytest.fail(f'no {word}: {process.communicate(timeout=60)[1][-3000:]}')


def _wait_gone(pids, timeout):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    left = [p for p in pids if alive(p)]
    if not left:
      return []
    time.sleep(0.2)
  return left


def _kill_leftovers(pids):
  for pid in pids:
    if alive(pid):
      os.kill(pid, signal.SIGKILL)


def _communicate_or_dump(process, timeout):
  """The child's stderr once it exits; fails with its thread stacks if not."""
  try:
    return process.communicate(timeout=timeout)[1]
  except subprocess.TimeoutExpired:
    os.kill(process.pid, signal.SIGUSR1)
    time.sleep(2)
    os.kill(process.pid, signal.SIGKILL)
    stderr = process.communicate()[1]
    pytest.fail(f'still running {timeout} s after the signal; its threads:\n'
                f'{stderr[-6000:]}')


def _tracebacks(stderr):
  return stderr.count('Traceback (most recent call last)')


@pytest.mark.parametrize('how,iterators', [
    ('SIGKILL', 'eval'), ('SIGTERM', 'eval'), ('SIGINT to the group', 'train')])
def test_workers_end_with_a_killed_parent(how, iterators, fashion_idx_dir,
                                          tfds_dir):
  process = _start(_ITERATE, fashion_idx_dir, tfds_dir, 'wait', iterators,
                   start_new_session=True)
  workers = []
  try:
    _wait_for(process, 'READY')
    workers = descendants(process.pid)
    # Two per iterator, and multiprocessing's resource tracker.
    assert len(workers) >= (4 if iterators == 'eval' else 2)
    if how == 'SIGINT to the group':  # Ctrl-C in a terminal
      os.killpg(process.pid, signal.SIGINT)
    else:
      os.kill(process.pid, getattr(signal, how))
    # Grain stops each worker's process within 25 s before killing it
    # (process_prefetch._PROCESS_KILL_TIMEOUT_S), one after another: a slow
    # but finite exit on a loaded machine, not a hang.
    stderr = _communicate_or_dump(process, timeout=120)
    left = _wait_gone(workers, timeout=10)
    assert not left, f'orphaned workers {left} after {how}'
  finally:
    _kill_leftovers([process.pid] + workers)
  if how == 'SIGINT to the group':
    # The parent's KeyboardInterrupt only: the workers ignore SIGINT.
    assert _tracebacks(stderr) <= 1, stderr[-3000:]
    assert 'KeyboardInterrupt' in stderr
  assert 'BrokenPipeError' not in stderr


@pytest.mark.parametrize('end', ['normal', 'raise'])
def test_workers_end_with_their_parent(end, fashion_idx_dir, tfds_dir):
  process = _start(_ITERATE, fashion_idx_dir, tfds_dir, end, 'train')
  workers = []
  try:
    _wait_for(process, 'READY')
    workers = descendants(process.pid)
    assert len(workers) >= 2
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == (0 if end == 'normal' else 1), stderr[-3000:]
    assert not _wait_gone(workers, timeout=10)
  finally:
    _kill_leftovers([process.pid] + workers)
  assert _tracebacks(stderr) == (0 if end == 'normal' else 1), stderr[-3000:]


# Reads training batches after damaging the prepared dataset (argv[3]).
_DAMAGED = _CONFIG + """
import glob
from vgg_jax import input_pipeline

def main():
  config = tiny_config()
  input_pipeline.get_dataset_info(config)  # prepares it
  files = glob.glob(os.path.join(sys.argv[2], 'fashion_mnist_idx', '1.0.0',
                                 '*train.array_record*'))
  assert files
  for path in files:
    if sys.argv[3] == 'deleted':
      os.remove(path)
    else:
      with open(path, 'r+b') as f:
        f.seek(100)
        f.write(b'garbage' * 1000)
  train = input_pipeline.create_train_iterator(config)
  for _ in range(10):
    next(train)

main()
"""


@pytest.mark.parametrize('damage', ['deleted', 'overwritten'])
def test_a_failing_worker_gives_one_clear_error(damage, fashion_idx_dir,
                                                tmp_path):
  process = _start(_DAMAGED, fashion_idx_dir, tmp_path / 'tfds', damage)
  _, stderr = process.communicate(timeout=240)
  assert process.returncode == 1
  assert _tracebacks(stderr) <= 1, stderr[-3000:]
  assert 'DamagedDatasetError' in stderr
  assert 'fashion_mnist_idx-train.array_record' in stderr
  assert 'prepare it again' in stderr
  for noise in ('handle is closed', 'BrokenPipeError', 'Exception ignored'):
    assert noise not in stderr, stderr[-3000:]


# Prepares the dataset, each record slowed down so that it can be killed
# mid-way; argv[3] says through which entry point.
_PREPARE = _CONFIG + """
import time
from vgg_jax.datasets import fashion_mnist

_png_bytes = fashion_mnist._png_bytes
def slow_png_bytes(image):
  time.sleep(float(os.environ.get('SLOW_RECORD_S', '0')))
  return _png_bytes(image)
fashion_mnist._png_bytes = slow_png_bytes

print('STARTED', flush=True)
if sys.argv[3] == 'cli':  # python -m vgg_jax.datasets.prepare
  import runpy
  sys.argv = ['prepare', '--dataset=fashion_mnist',
              '--manual_dir=' + sys.argv[1], '--data_dir=' + sys.argv[2]]
  runpy.run_module('vgg_jax.datasets.prepare', run_name='__main__')
else:  # What training does on its first run.
  from vgg_jax import input_pipeline
  info = input_pipeline.get_dataset_info(tiny_config())
  print('PREPARED', dict(info.num_examples), flush=True)
"""


def _prepare(idx_dir, data_dir, how, slow_s):
  env = dict(os.environ, SLOW_RECORD_S=str(slow_s))
  return _start(_PREPARE, idx_dir, data_dir, how, env=env)


def _read_all(data_dir, idx_dir):
  builder = datasets.get_builder('fashion_mnist', data_dir=str(data_dir),
                                 manual_dir=str(idx_dir))
  assert datasets.is_prepared(builder)
  info = datasets.dataset_info(builder)
  assert info.num_examples == {'train': 160, 'test': 40}
  for split, n in info.num_examples.items():
    source = datasets.data_source(builder, split, info)
    assert len(source) == n
    assert all(source[i]['label'] < 10 for i in range(n))


@pytest.mark.parametrize('how', ['cli', 'training'])
def test_killed_preparation_is_redone_on_the_next_run(how, fashion_idx_dir,
                                                      tmp_path):
  data_dir = tmp_path / 'tfds'
  process = _prepare(fashion_idx_dir, data_dir, how, slow_s=0.05)
  try:
    _wait_for(process, 'STARTED')
    dataset_dir = data_dir / 'fashion_mnist_idx'
    deadline = time.monotonic() + 120
    while not list(dataset_dir.glob('incomplete.*/*.array_record*')):
      assert time.monotonic() < deadline and process.poll() is None
      time.sleep(0.1)
    time.sleep(1)  # well into writing records (200 records take 10 s)
  finally:
    process.kill()
    process.communicate()
  builder = datasets.get_builder('fashion_mnist', data_dir=str(data_dir),
                                 manual_dir=str(fashion_idx_dir))
  assert not datasets.is_prepared(builder)  # nothing half-written is read
  assert list(dataset_dir.glob('incomplete.*'))
  rerun = _prepare(fashion_idx_dir, data_dir, how, slow_s=0)
  stdout, stderr = rerun.communicate(timeout=240)
  assert rerun.returncode == 0, stderr[-3000:]
  assert "'train': 160" in stdout
  assert not list(dataset_dir.glob('incomplete.*'))  # the leftover is gone
  _read_all(data_dir, fashion_idx_dir)


def test_concurrent_preparations_make_one_dataset(fashion_idx_dir, tmp_path):
  data_dir = tmp_path / 'tfds'
  runs = [_prepare(fashion_idx_dir, data_dir, how, slow_s=0.01)
          for how in ('cli', 'training')]
  results = [run.communicate(timeout=300) for run in runs]
  for run, (stdout, stderr) in zip(runs, results):
    assert run.returncode == 0, stderr[-3000:]
    assert "'train': 160" in stdout
  # One of them waited for the other, then read what it wrote.
  assert sum('Waiting for another process' in e for _, e in results) == 1
  assert sum('Generating splits' in e for _, e in results) == 1
  dataset_dir = data_dir / 'fashion_mnist_idx'
  assert [p.name for p in dataset_dir.iterdir()] == ['1.0.0']
  _read_all(data_dir, fashion_idx_dir)
