"""vgg_jax.optim: the paper's SGD, weight-decay mask, schedules, plateau."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vgg_jax import models
from vgg_jax import optim
from vgg_jax.configs import base


def _config(schedule, warmup_epochs=0.0, boundaries=(1.0, 2.0), lr=0.01):
  config = base.get_config()
  config.train.schedule = schedule
  config.train.warmup_epochs = warmup_epochs
  config.train.step_boundaries_epochs = boundaries
  config.train.learning_rate = lr
  return config


def reference_schedule(t, steps_per_epoch, total_steps):
  """The schedule as plain Python (the formula before Optax built it)."""
  lr = float(t.learning_rate)
  warmup = int(round(t.warmup_epochs * steps_per_epoch))

  def schedule(step):
    if step < warmup:
      return lr * (step + 1) / warmup
    if t.schedule == 'plateau':
      return lr
    if t.schedule == 'step':
      drops = sum(step >= b * steps_per_epoch
                  for b in t.step_boundaries_epochs)
      return lr * 0.1 ** drops
    progress = (step - warmup) / max(1, total_steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
  return schedule


# warmup_epochs * steps_per_epoch = 0, 1, 2 and 7 warm-up steps; step
# boundaries on, between and inside warm-up steps, and repeated.
CASES = [
    (schedule, warmup, spe, total, bounds)
    for schedule, bounds in [('plateau', (1.0,)), ('cosine', (1.0,)),
                             ('step', (1.0, 2.0)), ('step', (0.5, 1.5, 1.5)),
                             ('step', (0.05, 2.25))]
    for warmup, spe, total in [(0.0, 10, 30), (0.1, 10, 30), (0.2, 10, 37),
                               (1.0, 7, 20), (1.0, 7, 5)]
]


@pytest.mark.parametrize('schedule,warmup,spe,total,bounds', CASES)
def test_optax_schedule_equals_the_plain_formula(schedule, warmup, spe, total,
                                                 bounds):
  config = _config(schedule, warmup, bounds)
  new = optim.base_schedule(config, spe, total)
  old = reference_schedule(config.train, spe, total)
  steps = range(total + 15)  # past the end: cosine stays at 0
  got = np.array([new(s) for s in steps])
  want = np.array([old(s) for s in steps])
  assert all(isinstance(new(s), float) for s in (0, total, total + 100))
  # float64 to rounding, and the float32 the train step is fed is equal.
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-17)
  np.testing.assert_array_equal(got.astype(np.float32),
                                want.astype(np.float32))


def test_schedule_landmarks():
  lr = optim.base_schedule(_config('step'), steps_per_epoch=10,
                           total_steps=30)
  assert [lr(0), lr(9), lr(10), lr(19), lr(20), lr(25)] == pytest.approx(
      [0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001])
  lr = optim.base_schedule(_config('cosine'), steps_per_epoch=10,
                           total_steps=30)
  assert lr(0) == pytest.approx(0.01) and lr(30) == pytest.approx(0.0)
  assert lr(15) == pytest.approx(0.005)
  # One warm-up step is the full rate; four ramp 1/4, 2/4, 3/4, 4/4.
  lr = optim.base_schedule(_config('plateau', warmup_epochs=0.1), 10, 30)
  assert lr(0) == 0.01
  lr = optim.base_schedule(_config('plateau', warmup_epochs=0.4), 10, 30)
  assert [lr(s) for s in range(6)] == pytest.approx(
      [0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])


def test_optax_schedule_runs_under_jit():
  config = _config('cosine', warmup_epochs=0.5)
  schedule = jax.jit(optim.learning_rate_schedule(config, 10, 30))
  host = optim.base_schedule(config, 10, 30)
  for step in (0, 4, 5, 17, 30):
    np.testing.assert_allclose(float(schedule(step)), host(step), rtol=1e-6)


def test_bad_schedule_configs():
  with pytest.raises(ValueError, match="Unknown train.schedule 'linear'"):
    optim.base_schedule(_config('linear'), 10, 30)
  with pytest.raises(ValueError, match='learning_rate 0.0: must be > 0'):
    optim.base_schedule(_config('step', lr=0.0), 10, 30)
  with pytest.raises(ValueError, match='warmup_epochs -1.0: must be >= 0'):
    optim.base_schedule(_config('step', warmup_epochs=-1.0), 10, 30)


def test_plateau_drops_after_patience_at_most_max_drops():
  p = optim.Plateau(patience=2, factor=0.1, max_drops=2)
  assert p.update(0.5) == 'improved' and p.scale == 1
  assert p.update(0.5) == 'waiting'
  assert p.update(0.4) == 'dropped' and p.scale == pytest.approx(0.1)
  assert p.update(0.6) == 'improved'
  assert [p.update(0.6), p.update(0.6)] == ['waiting', 'dropped']
  assert p.scale == pytest.approx(0.01)
  assert [p.update(0.1), p.update(0.1)] == ['waiting', 'exhausted']
  assert p.drops == 2 and p.scale == pytest.approx(0.01)
  q = optim.Plateau(patience=2, factor=0.1, max_drops=2)
  q.load_state_dict(json.loads(json.dumps(p.state_dict())))
  assert (q.best, q.drops, q.bad_evals) == (p.best, p.drops, p.bad_evals)


def test_plateau_from_config_checks_it():
  config = base.get_config()
  config.train.plateau_patience = 0
  with pytest.raises(ValueError, match='patience=0 must be >= 1'):
    optim.Plateau.from_config(config)


def test_weight_decay_masks_biases_and_norms_by_default():
  config = base.get_config()
  # Shapes only, then filled: initialising a model costs seconds.
  model = models.abstract_model('vgg11_bn', width_multiplier=1 / 16,
                                num_classes=10, fc6_kernel=1)
  params = jax.tree.map(lambda a: jnp.full(a.shape, 2.0, a.dtype),
                        nnx.state(model, nnx.Param))
  for decay_all in (False, True):
    config.train.decay_biases_and_norms = decay_all
    config.train.momentum = 0.0
    tx = optim.create_optimizer(config, params)
    zero = jax.tree.map(jnp.zeros_like, params)
    # One compiled update rather than an eager op per leaf.
    updates, _ = jax.jit(tx.update)(zero, tx.init(params), params)
    for (path, u), (_, p) in zip(nnx.to_flat_state(updates),
                                 nnx.to_flat_state(params)):
      u, p = np.asarray(u[...]), np.asarray(p[...])
      if path[-1] == 'kernel' or decay_all:
        np.testing.assert_allclose(u, config.train.weight_decay * p,
                                   rtol=1e-6)
      else:
        assert not np.any(u), path


def test_momentum_then_learning_rate_outside_the_chain():
  config = base.get_config()
  config.train.weight_decay = 0.0
  config.train.momentum = 0.9
  params = {'kernel': jnp.ones((2,), jnp.float32)}
  tx = optim.create_optimizer(config, params)
  state = tx.init(params)
  u1, state = tx.update(params, state, params)  # gradient 1
  u2, state = tx.update(params, state, params)
  np.testing.assert_allclose(u2['kernel'], 1.9, rtol=1e-6)  # 0.9 * 1 + 1
  half = {'kernel': jnp.ones((2,), jnp.bfloat16)}
  new = optim.apply_updates(half, u1, jnp.float32(0.25))
  assert new['kernel'].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(new['kernel'], np.float32), 0.75)
  config.train.momentum = 1.0
  with pytest.raises(ValueError, match='momentum=1.0 in \\[0, 1\\)'):
    optim.create_optimizer(config, params)
