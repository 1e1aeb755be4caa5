"""Joining a multi-process run (the peer-loss faults: test_faults_train.py)."""

import threading
import time

import pytest

from vgg_jax import distributed


def test_wants_distributed_reads_the_flag_then_the_environment():
  assert distributed.wants_distributed('true', {}) is True
  assert not distributed.wants_distributed('false',
                                          {'VGG_JAX_COORDINATOR': 'h:1'})
  assert distributed.wants_distributed('auto', {}) is False
  assert distributed.wants_distributed('auto',
                                      {'VGG_JAX_COORDINATOR': 'h:1'})
  assert distributed.wants_distributed('auto',
                                      {'TPU_WORKER_HOSTNAMES': 'a,b'})
  assert not distributed.wants_distributed('auto',
                                          {'TPU_WORKER_HOSTNAMES': 'a'})
  assert distributed.wants_distributed('auto', {'SLURM_NTASKS': '2'})
  assert not distributed.wants_distributed('auto',
                                          {'OMPI_COMM_WORLD_SIZE': '1'})


def test_initialize_bounds_every_wait(monkeypatch):
  calls = []
  monkeypatch.setattr(distributed.jax.distributed, 'initialize',
                      lambda **kwargs: calls.append(kwargs))
  assert not distributed.initialize('false', 7.5)
  monkeypatch.setenv('VGG_JAX_COORDINATOR', 'localhost:1234')
  monkeypatch.setenv('VGG_JAX_NUM_PROCESSES', '2')
  monkeypatch.setenv('VGG_JAX_PROCESS_ID', '1')
  assert distributed.initialize('auto', 7.5)
  # JAX's own limits are the backstop, after the one-line timer and watchdog.
  assert calls == [dict(coordinator_address='localhost:1234',
                        num_processes=2, process_id=1,
                        initialization_timeout=16,
                        heartbeat_timeout_seconds=16,
                        shutdown_timeout_seconds=8)]

  def refuse(**kwargs):
    raise ValueError(f'bad address {kwargs["coordinator_address"]}')
  monkeypatch.setattr(distributed.jax.distributed, 'initialize', refuse)
  with pytest.raises(distributed.PeerLostError,
                     match='Could not join .*bad address localhost:1234'):
    distributed.initialize('auto', 7.5)


class _KeyValueStore:
  """The coordination service's key-value store, as the watchdog uses it."""

  def __init__(self, **values):
    self.values = dict(values)
    self.lock = threading.Lock()

  def key_value_set(self, key, value, allow_overwrite=False):
    del allow_overwrite
    with self.lock:
      self.values[key] = value

  def key_value_dir_get(self, directory):
    with self.lock:
      return [(k, v) for k, v in self.values.items()
              if k.startswith(directory)]


def _peer_beats(store, stop, key):
  beat = 100
  while not stop.wait(0.02):
    beat += 1
    store.key_value_set(key, str(beat))


def test_the_watchdog_does_not_take_a_dead_peers_last_beat_for_life(
    monkeypatch):
  # Process 0 of 2. Peer 1 beat once, then died; this process's error
  # (a collective the death broke) comes before the watchdog first reads
  # that beat, which must not count as a sign of life after the error.
  key = distributed._HEARTBEAT_KEY + '1'
  store = _KeyValueStore(**{key: '1'})
  ended = []
  monkeypatch.setattr(distributed.jax, 'process_count', lambda: 2)
  monkeypatch.setattr(distributed.jax, 'process_index', lambda: 0)
  monkeypatch.setattr(distributed.orbax.checkpoint.multihost,
                      'get_jax_distributed_client', lambda: store)
  monkeypatch.setattr(distributed, 'exit_now', ended.append)
  with distributed.PeerWatchdog(timeout_s=0.5, poll_s=0.05) as watchdog:
    waiter = threading.Thread(target=watchdog.wait_for_peers)
    waiter.start()
    deadline = time.monotonic() + 30
    while not ended and time.monotonic() < deadline:
      time.sleep(0.05)
    assert waiter.is_alive()  # still waiting for a sign of life
    assert ended and 'process 1 of 2 has shown no sign of life' in str(
        ended[0])
    # A peer that does beat lets it go.
    stop = threading.Event()
    beater = threading.Thread(target=_peer_beats, args=(store, stop, key))
    beater.start()
    waiter.join(30)
    stop.set()
    beater.join()
    assert not waiter.is_alive()
  assert store.values[distributed._HEARTBEAT_KEY + '0'] == distributed._DONE
