r"""Trains a VGG net: ``python -m vgg_jax.main --config=configs/vgg16.py --workdir=DIR``.

Config fields can be overridden: ``--config.train.batch_size=128``. A run
restarted on the same workdir resumes from its latest checkpoint.

Multi-process (one process per host): on Cloud TPU VMs and under SLURM JAX
finds its peers itself; elsewhere set ``VGG_JAX_COORDINATOR=host:port``,
``VGG_JAX_NUM_PROCESSES`` and ``VGG_JAX_PROCESS_ID``. ``--multiprocess``
forces (true) or forbids (false) ``jax.distributed.initialize``.

A config value that cannot train, a missing dataset, a workdir whose
checkpoint was written for another model or is damaged beyond fallback, a
non-finite loss, a checkpoint that cannot be written (a full disk) or a lost
peer process ends the program with one line on stderr and exit status 1.

A multi-process run waits at most ``config.train.peer_timeout_s`` for its
processes to arrive at start-up; once running, each process stops with one
error line when another has shown no sign of life for that long (killed,
crashed or hung), instead of waiting in a collective for ever. The workdir
then resumes from its latest checkpoint when all processes are restarted.
"""

from vgg_jax import host_memory

if __name__ == '__main__':  # first: glibc reads its tunables at start-up
  host_memory.reexec_with_huge_pages()

# pylint: disable=g-import-not-at-top,wrong-import-position
import platform
import sys

import flax
import grain
import jax
import ml_collections
import optax
import orbax.checkpoint
from absl import flags
from absl import logging
from ml_collections import config_flags

from vgg_jax import checkpointing
from vgg_jax import cli
from vgg_jax import distributed
from vgg_jax import train

# Errors that end a run for a reason the message names; a traceback would
# only bury it.
_RUN_ERRORS = (train.NonFiniteLossError, checkpointing.CheckpointSaveError,
               distributed.PeerLostError)


def define_flags(flag_values: flags.FlagValues) -> None:
  """Registers ``--config`` (with ``--config.field=value``), ``--workdir``...

  Args:
    flag_values: where to register them (``flags.FLAGS`` from the command
      line, a fresh ``FlagValues`` from ``cli.call``).
  """
  # The config file is known at parse time, so config_flags parses the
  # --config.field overrides against it directly.
  config_flags.DEFINE_config_file(
      'config', None, 'Training configuration file.', lock_config=True,
      flag_values=flag_values)
  flags.DEFINE_string('workdir', None, 'Checkpoints and logs go here.',
                      flag_values=flag_values)
  flags.DEFINE_enum(
      'multiprocess', 'auto', ['auto', 'true', 'false'],
      'Call jax.distributed.initialize: auto = when the environment says '
      'there are several processes.', flag_values=flag_values)
  flags.mark_flags_as_required(['config', 'workdir'], flag_values=flag_values)


def _log_environment() -> None:
  logging.info('python %s, jax %s, flax %s, optax %s, orbax %s, grain %s',
               platform.python_version(), jax.__version__, flax.__version__,
               optax.__version__, orbax.checkpoint.__version__,
               getattr(grain, '__version__', '?'))
  logging.info('process %d of %d; %d local / %d global devices: %s',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), jax.devices())
  logging.info(host_memory.describe())


def main(flag_values: flags.FlagValues) -> int:
  """Trains (or resumes) the run the flags describe.

  Args:
    flag_values: parsed flags registered by ``define_flags``.

  Returns:
    0 when training ends (done, plateau or preempted), 1 after a run error
    (a non-finite loss, a failed save, a lost peer), reported in one line.
  """
  config = flag_values.config
  timeout = config.train.peer_timeout_s
  try:
    multiprocess = distributed.initialize(flag_values.multiprocess, timeout)
    _log_environment()
    if multiprocess:
      _train_with_peers(config, flag_values.workdir, timeout)
    else:
      train.train_and_evaluate(config, flag_values.workdir)
  except _RUN_ERRORS as e:  # user errors: one line from cli; bugs: traceback
    logging.flush()
    print(cli.error_line(e), file=sys.stderr)
    return 1
  return 0


def _train_with_peers(config: ml_collections.ConfigDict, workdir: str,
                      timeout_s: float) -> None:
  """``train_and_evaluate`` under a `PeerWatchdog`; an error ends the process.

  An error here may be a collective or checkpoint barrier that failed
  because a peer died, with a message that does not say so (Gloo's
  "connection reset"); the error is reported once every peer is seen alive,
  and otherwise the watchdog reports the silent peer within ``timeout_s``.
  """
  with distributed.PeerWatchdog(timeout_s) as watchdog:
    try:
      train.train_and_evaluate(config, workdir)
    except Exception as e:  # pylint: disable=broad-except
      watchdog.wait_for_peers()
      distributed.exit_now(e, known=_RUN_ERRORS)


if __name__ == '__main__':
  cli.run(define_flags, main)
