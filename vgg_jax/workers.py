"""Grain worker processes that end with their parent, and end quietly.

``IterDataset.mp_prefetch`` spawns daemon worker processes. A parent that
ends normally or by an exception stops them (Grain's finalizers and
multiprocessing's exit handler), but a parent that is killed (``kill -9``, the
OOM killer, a preempted VM, SIGTERM without a handler) runs no exit code, and
its workers, blocked on a full queue, would live on for good (~300 MB each;
every restart would add more). `prefetch` starts each worker with
`init_worker`, which

* starts a watchdog thread that ends the worker (``os._exit``) within
  `POLL_INTERVAL_S` of its parent's death, whatever killed the parent;
* ignores SIGINT: Ctrl-C reaches the whole process group, and the parent
  handles it and stops its workers (a KeyboardInterrupt traceback from every
  worker would bury the parent's own message);
* ends the worker quietly instead of printing a broken-pipe traceback when
  its output queue fails because the parent is dying.

`close_at_exit` closes the parent's iterators when its interpreter exits,
before the interpreter tears down the modules that Grain's own clean-up
(``__del__`` of iterators and shared-memory arrays) still needs; left to
those, every buffered batch prints an "Exception ignored" traceback after
an interrupted or failed run.

A Ctrl-C in the second or so while a worker is still starting, before
`init_worker` runs, still gives that worker its own KeyboardInterrupt
traceback. Linux's ``prctl(PR_SET_PDEATHSIG)`` is not used: it fires when
the *thread* that started the child ends, and Grain starts workers from its
own pool and prefetch threads, whose lifetime it does not promise.
"""

from __future__ import annotations

import atexit
import multiprocessing
from multiprocessing import queues
import os
import signal
import threading
import time
import traceback
import weakref

from absl import flags
from absl import logging
import grain

# How often a worker checks that its parent is alive.
POLL_INTERVAL_S = 0.5
# How long a worker whose output pipe broke waits for its parent to be gone.
_BROKEN_PIPE_GRACE_S = 2.0


def prefetch(ds: grain.IterDataset, *, num_workers: int,
             buffer_size: int) -> grain.IterDataset:
  """``ds.mp_prefetch`` with workers that never outlive this process.

  Args:
    ds: the dataset to run in worker processes.
    num_workers: worker processes (0: ``ds`` unchanged, read in-process).
    buffer_size: elements each worker prepares ahead.

  Returns:
    The prefetching dataset.
  """
  if num_workers < 0:
    raise ValueError(f'data.num_workers must be >= 0, got {num_workers}.')
  if num_workers == 0:
    return ds
  # Grain's worker processes read absl flags; in programs that never parsed
  # them (tests, notebooks) reading would raise.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=num_workers,
                                   per_worker_buffer_size=buffer_size),
      worker_init_fn=init_worker)


# Iterators of this process that `close_at_exit` closes.
_open_iterators: weakref.WeakSet[grain.DatasetIterator] = weakref.WeakSet()


def close_at_exit(iterator: grain.DatasetIterator) -> grain.DatasetIterator:
  """Registers ``iterator`` to be closed when the interpreter exits.

  Args:
    iterator: an iterator whose pipeline may hold worker processes.

  Returns:
    ``iterator``.
  """
  _open_iterators.add(iterator)
  return iterator


@atexit.register
def _close_open_iterators() -> None:
  # Registered after multiprocessing's exit handler, so it runs before it.
  iterators = list(_open_iterators)
  for iterator in iterators:
    try:
      iterator.close()
    except Exception as e:  # pylint: disable=broad-except
      # The process is ending anyway; a traceback would bury its real news.
      logging.debug('Closing %s at exit: %r', iterator, e)
  if iterators:
    # Closed now; Grain's __del__ would close them again during teardown,
    # when the module globals it uses are already gone, and print one
    # "Exception ignored" traceback per iterator.
    grain.DatasetIterator.__del__ = _closed_already


def _closed_already(iterator: grain.DatasetIterator) -> None:
  del iterator


def init_worker(worker_index: int, worker_count: int) -> None:
  """Runs first in every worker process (see the module docstring).

  Args:
    worker_index: this worker (unused).
    worker_count: number of workers (unused).
  """
  del worker_index, worker_count
  parent = multiprocessing.parent_process()
  if parent is None:  # Not a multiprocessing child: nothing to watch.
    return
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  # pylint: disable-next=protected-access
  queues.Queue._on_queue_feeder_error = staticmethod(_on_feeder_error)
  threading.Thread(target=_exit_with_parent, args=(parent.pid,),
                   name='exit-with-parent', daemon=True).start()


def _parent_gone(parent_pid: int) -> bool:
  # An orphan is adopted by init or a subreaper: its parent id changes.
  return os.getppid() != parent_pid


def _exit_with_parent(parent_pid: int) -> None:
  while not _parent_gone(parent_pid):
    time.sleep(POLL_INTERVAL_S)
  # Nothing is left to deliver to: skip the exit handlers, which would block
  # on the queues to the dead parent.
  os._exit(0)  # pylint: disable=protected-access


def _on_feeder_error(error: Exception, obj: object) -> None:
  """Replaces the queue feeder thread's error printer in workers."""
  del obj
  parent = multiprocessing.parent_process()
  if isinstance(error, OSError) and parent is not None:
    # The pipe breaks while the parent exits, a moment before it is
    # reparented; a parent that died is no news worth a traceback.
    deadline = time.monotonic() + _BROKEN_PIPE_GRACE_S
    while time.monotonic() < deadline:
      if _parent_gone(parent.pid):
        os._exit(0)  # pylint: disable=protected-access
      time.sleep(0.05)
  traceback.print_exc()  # What multiprocessing prints by default.
