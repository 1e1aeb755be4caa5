"""Joining a multi-process run (the peer-loss faults: test_faults_train.py)."""

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
