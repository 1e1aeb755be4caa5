"""Shared fixtures: a tiny Fashion-MNIST-format dataset, tiny configs, a run."""

import importlib.util
import os
import pathlib
import shutil
import tempfile

# Most tests train or evaluate the same tiny nets, in this process, in the
# other xdist worker and in subprocesses: one persistent compilation cache
# for the whole session (set before JAX is imported, and inherited by the
# workers and subprocesses) compiles each program once instead of per test.
_OWN_CACHE = None
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix='vgg_jax_tests_jit_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _OWN_CACHE
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax import export

from vgg_jax import train
from vgg_jax.datasets import testing


def pytest_unconfigure(config):
  del config  # the process that made the cache removes it, once all is done
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name):
  """``configs/<name>.py``'s ``get_config()``, loaded the way config_flags does."""
  spec = importlib.util.spec_from_file_location(
      f'configs_{name}', REPO / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def learnable_images(n, seed):
  """28x28 grey images whose class is where a bright square sits."""
  rng = np.random.RandomState(seed)
  labels = np.arange(n) % 10
  rng.shuffle(labels)
  images = rng.randint(0, 60, (n, 28, 28)).astype(np.uint8)
  for img, c in zip(images, labels):
    r, q = divmod(int(c), 5)
    img[2 + 12 * r:12 + 12 * r, 1 + 5 * q:6 + 5 * q] = 230
  return images, labels


def smooth_image(width, height, seed=0):
  """A smooth colour image (JPEG-friendly), values well inside 0-255."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width]
  channels = []
  for _ in range(3):
    fx, fy, phase = rng.uniform(0.5, 3, 2).tolist() + [rng.uniform(0, 6)]
    channels.append(128 + 90 * np.sin(fx * x / width * 6 + fy * y / height * 6
                                      + phase))
  return np.stack(channels, -1).round().astype(np.uint8)


def accelerator_convs(fn, *args) -> int:
  """Convolutions in ``fn(*args)`` as lowered for a GPU.

  On CPU, ``vgg_jax.ops`` lowers some convolutions as matrix products, so
  tests that count the convolutions a computation runs count those of the
  default lowering, which every other backend gets.
  """
  text = export.export(jax.jit(fn), platforms=['cuda'])(*args).mlir_module()
  return text.count('stablehlo.convolution')


def _ppid_and_state(pid):
  try:
    with open(f'/proc/{pid}/stat') as f:
      fields = f.read().rsplit(')', 1)[1].split()
  except (FileNotFoundError, ProcessLookupError):
    return None
  return int(fields[1]), fields[0]


def alive(pid):
  """Whether process ``pid`` exists and is not a zombie (from /proc)."""
  info = _ppid_and_state(pid)
  return info is not None and info[1] != 'Z'


def descendants(pid):
  """Live processes below ``pid`` (from /proc)."""
  parents = {}
  for entry in os.listdir('/proc'):
    if entry.isdigit():
      info = _ppid_and_state(int(entry))
      if info and info[1] != 'Z':
        parents.setdefault(info[0], []).append(int(entry))
  found, todo = [], [pid]
  while todo:
    children = parents.get(todo.pop(), [])
    found += children
    todo += children
  return found


@pytest.fixture(scope='session')
def fashion_idx_dir(tmp_path_factory):
  """A directory with tiny train (160) / t10k (40) IDX files."""
  d = tmp_path_factory.mktemp('fashion_idx')
  testing.write_idx_files(d, {'train': learnable_images(160, 0),
                              'test': learnable_images(40, 1)})
  return d


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory):
  """A TFDS data dir shared by a test session: the tiny set is prepared once."""
  return tmp_path_factory.mktemp('tfds')


def make_tiny_config(fashion_idx_dir, tfds_dir):
  """The quickstart config shrunk to seconds: 1/16 width, batch 16."""
  config = load_config('quickstart')
  config.data.manual_dir = str(fashion_idx_dir)
  config.data.data_dir = str(tfds_dir)
  config.data.num_workers = 0
  # The host's augmentation, whose batches tests build by hand; the
  # quickstart's on-device path: tests/test_device_augment.py.
  config.input.augment_on_device = False
  config.model.name = 'vgg11'  # plain net A: the init-from-A tests need it
  config.model.width_multiplier = 1 / 16
  config.train.batch_size = 16
  config.train.eval_batch_size = 8
  config.train.max_steps = 6
  config.train.log_every_steps = 2
  config.train.eval_every_steps = 1000
  config.train.checkpoint_every_steps = 1000
  config.train.learning_rate = 0.01
  return config


# Fields of ``make_tiny_config`` that differ from configs/quickstart.py (for
# passing the tiny config to a command line or a config file).
TINY_FIELDS = ('data.manual_dir', 'data.data_dir', 'data.num_workers',
               'input.augment_on_device',
               'model.name', 'model.width_multiplier', 'train.batch_size',
               'train.eval_batch_size', 'train.max_steps',
               'train.log_every_steps', 'train.eval_every_steps',
               'train.checkpoint_every_steps', 'train.learning_rate')


def restore_iterator_state(iterator, restored, directory):
  """Saves ``iterator``'s position through Orbax, as training does, and
  restores it into ``restored`` (a fresh iterator of the same config)."""
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=True))
  manager.save(0, args=ocp.args.Composite(
      data=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  manager.restore(0, args=ocp.args.Composite(
      data=grain.checkpoint.CheckpointRestore(restored)))
  manager.close()


def one_error_line(capsys):
  """The one line a command wrote to stderr (no traceback), for user errors."""
  err = capsys.readouterr().err
  assert 'Traceback (most recent call last)' not in err, err
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1, err
  return lines[0]


def train_straight_and_split(config, root, steps, split):
  """Trains ``steps`` steps in one run (``root/straight``) and in two
  (``root/split``, stopped after ``split`` and resumed); returns the
  resumed run's summary."""
  config.train.max_steps = steps
  train.train_and_evaluate(config, str(root / 'straight'))
  config.train.max_steps = split
  train.train_and_evaluate(config, str(root / 'split'))
  config.train.max_steps = steps
  return train.train_and_evaluate(config, str(root / 'split'))


@pytest.fixture
def tiny_config(fashion_idx_dir, tfds_dir):
  """The quickstart config shrunk to seconds: 1/16 width, batch 16."""
  return make_tiny_config(fashion_idx_dir, tfds_dir)


@pytest.fixture(scope='session')
def net_a_run(tmp_path_factory, fashion_idx_dir, tfds_dir):
  """A training workdir of the tiny plain net A (``vgg11``) after 2 steps.

  Shared by the session and read-only: tests that train on it or change it
  use ``net_a_copy``. Its one checkpoint (step 2) has a validation result.
  """
  config = make_tiny_config(fashion_idx_dir, tfds_dir)
  config.train.max_steps = 2
  workdir = tmp_path_factory.mktemp('net_a') / 'run'
  train.train_and_evaluate(config, str(workdir))
  return workdir


@pytest.fixture
def net_a_copy(net_a_run, tmp_path):
  """A private copy of ``net_a_run``'s workdir, to train on or change."""
  return pathlib.Path(shutil.copytree(net_a_run, tmp_path / 'net_a_copy'))
