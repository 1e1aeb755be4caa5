r"""Trains a VGG net: ``python -m vgg_jax.main --config=configs/vgg16.py --workdir=DIR``.

Config fields can be overridden: ``--config.train.batch_size=128``. A run
restarted on the same workdir resumes from its latest checkpoint.

Multi-process (one process per host): on Cloud TPU VMs and under SLURM JAX
finds its peers itself; elsewhere set ``VGG_JAX_COORDINATOR=host:port``,
``VGG_JAX_NUM_PROCESSES`` and ``VGG_JAX_PROCESS_ID``. ``--multiprocess``
forces (true) or forbids (false) ``jax.distributed.initialize``.
"""

import os
import platform

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training configuration file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints and logs go here.')
_MULTIPROCESS = flags.DEFINE_enum(
    'multiprocess', 'auto', ['auto', 'true', 'false'],
    'Call jax.distributed.initialize: auto = when the environment says there '
    'are several processes.')
flags.mark_flags_as_required(['config', 'workdir'])

# Environment variables that announce a multi-process job.
_MULTIPROCESS_ENV = ('VGG_JAX_COORDINATOR', 'TPU_WORKER_HOSTNAMES',
                     'SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE')


def wants_distributed(setting: str, environ=os.environ) -> bool:
  """Whether to call ``jax.distributed.initialize`` for this process.

  Args:
    setting: the ``--multiprocess`` flag: ``true``, ``false`` or ``auto``.
    environ: the process environment.
  """
  if setting != 'auto':
    return setting == 'true'
  if environ.get('VGG_JAX_COORDINATOR'):
    return True
  hosts = environ.get('TPU_WORKER_HOSTNAMES', '')
  if len([h for h in hosts.split(',') if h]) > 1:
    return True
  for var in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
    if int(environ.get(var, '1') or 1) > 1:
      return True
  return False


def initialize_distributed(setting: str) -> None:
  """Joins the multi-process job if there is one; never fails single-host."""
  import jax  # pylint: disable=g-import-not-at-top
  if not wants_distributed(setting):
    return
  kwargs = {}
  if os.environ.get('VGG_JAX_COORDINATOR'):
    kwargs = dict(coordinator_address=os.environ['VGG_JAX_COORDINATOR'],
                  num_processes=int(os.environ['VGG_JAX_NUM_PROCESSES']),
                  process_id=int(os.environ['VGG_JAX_PROCESS_ID']))
  jax.distributed.initialize(**kwargs)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  initialize_distributed(_MULTIPROCESS.value)
  import jax  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint  # pylint: disable=g-import-not-at-top
  import grain  # pylint: disable=g-import-not-at-top
  from vgg_jax import train  # pylint: disable=g-import-not-at-top
  logging.info('python %s, jax %s, flax %s, optax %s, orbax %s, grain %s',
               platform.python_version(), jax.__version__, flax.__version__,
               optax.__version__, orbax.checkpoint.__version__,
               getattr(grain, '__version__', '?'))
  logging.info('process %d of %d; %d local / %d global devices: %s',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), jax.devices())
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
