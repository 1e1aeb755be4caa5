"""Multi-process runs: joining the job, and ending cleanly when a peer is lost.

``initialize`` calls ``jax.distributed.initialize`` when the environment
describes a multi-process job (Cloud TPU VMs, SLURM, MPI, or
``VGG_JAX_COORDINATOR``/``VGG_JAX_NUM_PROCESSES``/``VGG_JAX_PROCESS_ID``),
bounded by ``train.peer_timeout_s``. `PeerWatchdog` ends a process with one
error line when another process of the run stops showing signs of life,
rather than letting it wait in a collective for ever; the workdir then
resumes when all processes are restarted.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
import traceback
from typing import NamedTuple

from absl import logging
import jax
import orbax.checkpoint

from vgg_jax import checkpoint_damage
from vgg_jax import cli

# Default of `initialize`'s bound (configs set train.peer_timeout_s).
DEFAULT_PEER_TIMEOUT_S = 60.0
# JAX's own checks also end a process whose peer stopped or never arrived,
# but by an abort with C++ and Python stack dumps; `PeerWatchdog` and a timer
# in `initialize` stop it first with one line, so JAX's limits
# are this many times later, as a backstop.
_JAX_TIMEOUT_FACTOR = 2
# Key-value store directory of the watchdog's heartbeats.
_HEARTBEAT_KEY = 'vgg_jax/alive/'
_DONE = 'done'


class PeerLostError(RuntimeError):
  """Another process of the run died, hung or never arrived."""


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


def initialize(setting: str, peer_timeout_s: float = DEFAULT_PEER_TIMEOUT_S
               ) -> bool:
  """Joins the multi-process job if there is one; never fails single-host.

  Args:
    setting: the ``--multiprocess`` flag.
    peer_timeout_s: how long to wait for all processes to arrive.

  Returns:
    Whether this is a multi-process run.

  Raises:
    PeerLostError: joining failed (a bad coordinator address...).
  """
  if not wants_distributed(setting):
    return False
  kwargs = {}
  if os.environ.get('VGG_JAX_COORDINATOR'):
    kwargs = dict(coordinator_address=os.environ['VGG_JAX_COORDINATOR'],
                  num_processes=int(os.environ['VGG_JAX_NUM_PROCESSES']),
                  process_id=int(os.environ['VGG_JAX_PROCESS_ID']))
  timeout = max(1, math.ceil(peer_timeout_s))
  # JAX aborts with stack dumps when its own limit passes; this timer ends
  # the process first, with one line.
  missing = threading.Timer(timeout, exit_now, [PeerLostError(
      f'Not all processes of the run arrived within train.peer_timeout_s='
      f'{timeout} s (one not started, or the coordinator '
      f'{kwargs.get("coordinator_address", "")} unreachable).')])
  missing.daemon = True
  missing.start()
  try:
    jax.distributed.initialize(
        **kwargs, initialization_timeout=_JAX_TIMEOUT_FACTOR * timeout,
        heartbeat_timeout_seconds=_JAX_TIMEOUT_FACTOR * timeout,
        shutdown_timeout_seconds=timeout)
  except Exception as e:  # pylint: disable=broad-except
    # JAX raises its runtime error or a ValueError (a bad address...).
    raise PeerLostError('Could not join the multi-process run: '
                        f'{checkpoint_damage.error_summary(e)}') from e
  finally:
    missing.cancel()
  return True


class _Heartbeat(NamedTuple):
  """What the watchdog last read of one peer's heartbeat."""
  value: str | None  # the counter as stored; None before the first read
  since: float  # time.monotonic() when ``value`` was first read
  changes: int  # new values read so far


class PeerWatchdog:
  """Ends this process with one error line when a peer process stops.

  A daemon thread writes a heartbeat counter to JAX's coordination service
  every ``poll_s`` and reads the others'; a peer whose counter has not moved
  for ``timeout_s`` was killed, crashed or hangs, and this process would
  wait for it in the next collective or checkpoint barrier for good. Ending
  with ``os._exit`` skips the exit handlers, which would wait for the peer
  too; the last complete checkpoint is on disk, and this process's Grain
  workers follow it (``vgg_jax.workers``). A process that finishes normally
  says so, and is not waited for. If process 0 dies, the coordination
  service goes with it and JAX ends the others at once itself ("another task
  died").
  """

  def __init__(self, timeout_s: float, poll_s: float | None = None):
    self.timeout_s = float(timeout_s)
    self.poll_s = poll_s or min(1.0, self.timeout_s / 10)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, daemon=True,
                                    name='peer-watchdog')
    self._client = None
    # Written by the watchdog thread only.
    self._seen = {p: _Heartbeat(None, time.monotonic(), 0)
                  for p in range(jax.process_count())
                  if p != jax.process_index()}

  def __enter__(self) -> 'PeerWatchdog':
    self._client = orbax.checkpoint.multihost.get_jax_distributed_client()
    self._thread.start()
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    self._stop.set()
    self._thread.join()
    if exc_type is None:  # finished: the others need not wait for us
      try:
        self._client.key_value_set(self._key(jax.process_index()), _DONE,
                                   allow_overwrite=True)
      except Exception as e:  # pylint: disable=broad-except
        # The others finished too and process 0 took the service with it.
        logging.info('Could not report the end to the peers: %s', e)

  def _key(self, process: int) -> str:
    return f'{_HEARTBEAT_KEY}{process}'

  def wait_for_peers(self) -> None:
    """Returns once every peer has shown a sign of life since the call.

    If one does not, the watchdog ends this process within ``timeout_s``
    with the news that the peer stopped, and this never returns.
    """
    # A dead peer's last heartbeat may be read for the first time after the
    # call, once; two new values prove it beat after the call began.
    start = {p: beat.changes for p, beat in list(self._seen.items())}
    while any(beat.changes < start[p] + 2
              for p, beat in list(self._seen.items())):
      time.sleep(self.poll_s / 2)
    if jax.process_index() == 0:
      # The coordination service ends with process 0, and JAX aborts the
      # processes still using it: let them see this one alive first.
      time.sleep(3 * self.poll_s)

  def _watch(self) -> None:
    me, beat, seen = jax.process_index(), 0, self._seen
    while not self._stop.wait(self.poll_s):
      beat += 1
      try:
        self._client.key_value_set(self._key(me), str(beat),
                                   allow_overwrite=True)
        values = dict(self._client.key_value_dir_get(_HEARTBEAT_KEY))
      except Exception:  # pylint: disable=broad-except
        values = {}  # the service unreachable: no sign of life from anyone
      now = time.monotonic()
      for peer, heard in list(seen.items()):
        new = values.get(self._key(peer))
        if new == _DONE:
          del seen[peer]
        elif new is not None and new != heard.value:
          seen[peer] = _Heartbeat(new, now, heard.changes + 1)
        elif now - heard.since > self.timeout_s and not self._stop.is_set():
          self._end_process(peer)

  def _end_process(self, peer: int) -> None:
    exit_now(PeerLostError(
        f'process {peer} of {jax.process_count()} has shown no sign of life '
        f'for {self.timeout_s:g} s (train.peer_timeout_s): killed, crashed or '
        'hung. Stopping this process too; restart all processes to resume '
        'from the latest checkpoint.'))


def exit_now(error: BaseException,
             known: tuple[type[BaseException], ...] = ()) -> None:
  """Ends a process of a multi-process run at once, with one error line.

  The exit handlers are skipped: JAX's would wait at a shutdown barrier for
  peers that may be gone, then abort with stack dumps. A JAX runtime error
  (a collective or barrier with a dead peer) gets one line; any other
  error that is not a known run or user error keeps its traceback.

  Args:
    error: what ended the run.
    known: error types whose message says it all, besides `PeerLostError`
      and ``cli.USER_ERRORS``: no traceback for them either.
  """
  known = (PeerLostError, *known, *cli.USER_ERRORS)
  if isinstance(error, jax.errors.JaxRuntimeError):
    error = PeerLostError(
        f'{checkpoint_damage.error_summary(error)} (a collective with the other '
        'processes failed; if one of them died, its log says why)')
  elif not isinstance(error, known):
    traceback.print_exception(error)
  logging.flush()
  print(cli.error_line(error), file=sys.stderr, flush=True)
  os._exit(1)  # pylint: disable=protected-access
