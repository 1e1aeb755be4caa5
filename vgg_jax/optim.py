"""The paper's optimiser: SGD with momentum, L2 weight decay, plateau schedule.

Sec. 3.1: mini-batch SGD, momentum 0.9, weight decay 5e-4, learning rate 1e-2
divided by 10 when the validation accuracy stopped improving (three times).
The learning rate is applied outside the Optax chain (``p -= lr * update``), as
in Caffe and PyTorch, so a plateau drop acts on the next step without touching
the momentum buffer and the rate can be fed to the jitted step as a scalar.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import optax

SCHEDULES = ('plateau', 'step', 'cosine')


def decay_mask(params: Any, decay_biases_and_norms: bool) -> Any:
  """True for the leaves that take weight decay.

  Args:
    params: the parameter tree (leaves named ``kernel``, ``bias``, ``scale``).
    decay_biases_and_norms: also decay biases and BN scales/offsets (the paper
      and Caffe decay everything; common practice decays kernels only).
  """
  def is_decayed(path, _):
    # nnx.State paths may end in the Variable's own 'value' entry.
    names = [str(getattr(p, 'key', getattr(p, 'name', p))) for p in path]
    names = [n for n in names if n != 'value']
    return decay_biases_and_norms or names[-1] == 'kernel'
  return jax.tree_util.tree_map_with_path(is_decayed, params)


def create_optimizer(config: ml_collections.ConfigDict, params: Any
                     ) -> optax.GradientTransformation:
  """L2 weight decay added to the gradient, then heavy-ball momentum.

  Args:
    config: the run config (``train.weight_decay``, ``train.momentum``,
      ``train.decay_biases_and_norms``).
    params: the parameter tree, for the decay mask.

  Returns:
    A transformation whose output is to be scaled by ``-learning_rate``.
  """
  t = config.train
  if t.weight_decay < 0 or not 0 <= t.momentum < 1:
    raise ValueError(f'Bad optimiser config: weight_decay={t.weight_decay} '
                     f'must be >= 0 and momentum={t.momentum} in [0, 1).')
  return optax.chain(
      optax.add_decayed_weights(
          t.weight_decay, mask=decay_mask(params, t.decay_biases_and_norms)),
      optax.trace(decay=t.momentum, nesterov=False),
  )


def apply_updates(params: Any, updates: Any, learning_rate: jax.Array) -> Any:
  """``params - learning_rate * updates``, in each parameter's dtype."""
  return jax.tree.map(
      lambda p, u: (p - learning_rate * u).astype(p.dtype), params, updates)


def _after_warmup(config: ml_collections.ConfigDict, steps_per_epoch: int,
                  total_steps: int, warmup: int) -> optax.Schedule:
  """The schedule from the end of warm-up on (it counts from 0 there)."""
  t = config.train
  lr = float(t.learning_rate)
  if t.schedule == 'plateau':  # drops come from Plateau, outside
    return optax.constant_schedule(lr)
  if t.schedule == 'step':
    # x0.1 from the first integer step at or past each boundary epoch (equal
    # boundaries drop twice), counted from the end of warm-up.
    drops = collections.Counter(
        math.ceil(b * steps_per_epoch) - warmup
        for b in t.step_boundaries_epochs)
    return optax.piecewise_constant_schedule(
        lr, {step: 0.1 ** n for step, n in drops.items()})
  return optax.cosine_decay_schedule(lr, max(1, total_steps - warmup))


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           steps_per_epoch: int,
                           total_steps: int) -> optax.Schedule:
  """The step-indexed learning rate before any plateau drops, as Optax's.

  Linear warm-up to ``train.learning_rate`` over ``train.warmup_epochs``
  (``lr * (step + 1) / warmup`` at step ``step``), then ``plateau``: constant
  (``Plateau`` divides it); ``step``: x0.1 at each of
  ``train.step_boundaries_epochs``; ``cosine``: half a cosine from the rate
  to 0 at ``total_steps``.

  Args:
    config: the run config (``train.schedule``, ``train.learning_rate``,
      ``train.warmup_epochs``, ``train.step_boundaries_epochs``).
    steps_per_epoch: optimiser steps in one epoch.
    total_steps: length of the run, for cosine.

  Returns:
    An Optax schedule (jnp in, jnp out; usable under ``jit``).
  """
  t = config.train
  if t.schedule not in SCHEDULES:
    raise ValueError(f'Unknown train.schedule {t.schedule!r}; valid: '
                     f'{", ".join(SCHEDULES)}.')
  if t.learning_rate <= 0:
    raise ValueError(f'Bad train.learning_rate {t.learning_rate}: must be > 0.')
  if t.warmup_epochs < 0:
    raise ValueError(f'Bad train.warmup_epochs {t.warmup_epochs}: must be '
                     '>= 0.')
  lr = float(t.learning_rate)
  warmup = int(round(t.warmup_epochs * steps_per_epoch))
  after = _after_warmup(config, steps_per_epoch, total_steps, warmup)
  if warmup == 0:
    return after
  # Step s < warmup gets lr/warmup + s * (lr - lr/warmup) / (warmup - 1),
  # i.e. lr * (s + 1) / warmup: the first step already moves the weights.
  ramp = optax.linear_schedule(lr / warmup, lr, warmup - 1)
  return optax.join_schedules([ramp, after], [warmup])


class HostSchedule:
  """An Optax schedule read on the host as Python floats, one per step.

  The train loop passes the rate to the jitted step as a scalar. Evaluating
  the schedule's jnp ops there each step would run them on the accelerator
  and wait for the step in flight; instead every step of the run is
  evaluated once, in float64 (the precision the rate is logged in), and
  read from a table.
  """

  def __init__(self, schedule: optax.Schedule, num_steps: int):
    """Evaluates ``schedule`` at steps ``0..num_steps``.

    Args:
      schedule: an Optax schedule.
      num_steps: the last step tabulated; later steps are computed on demand.
    """
    self._schedule = schedule
    with self._on_host():
      steps = np.arange(max(num_steps, 0) + 1)
      self._table = np.asarray(jax.vmap(schedule)(steps), np.float64)

  @staticmethod
  @contextlib.contextmanager
  def _on_host():
    # float64 on the host CPU: accelerators (TPUs) may not support it.
    with jax.enable_x64(True), jax.default_device(
        jax.local_devices(backend='cpu')[0]):
      yield

  def __call__(self, step: int) -> float:
    """The rate at ``step``."""
    if 0 <= step < len(self._table):
      return float(self._table[step])
    with self._on_host():
      return float(self._schedule(step))


def base_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int,
                  total_steps: int) -> Callable[[int], float]:
  """``learning_rate_schedule`` as a host function of the integer step.

  Args:
    config: the run config (``train.schedule``, ``train.learning_rate``,
      ``train.warmup_epochs``, ``train.step_boundaries_epochs``).
    steps_per_epoch: optimiser steps in one epoch.
    total_steps: length of the run, for cosine.

  Returns:
    A function of the integer step returning a Python float.
  """
  return HostSchedule(
      learning_rate_schedule(config, steps_per_epoch, total_steps),
      total_steps)


@dataclasses.dataclass
class Plateau:
  """Divides the learning rate when validation top-1 stops improving.

  Attributes:
    patience: evaluations without improvement before a drop.
    factor: multiplier applied at each drop.
    max_drops: the most drops (the paper: 3).
    min_delta: the smallest top-1 gain that counts as improvement.
    best: best validation top-1 so far.
    bad_evals: evaluations since the last improvement or drop.
    drops: drops so far.
  """
  patience: int
  factor: float = 0.1
  max_drops: int = 3
  min_delta: float = 0.0
  best: float = -math.inf
  bad_evals: int = 0
  drops: int = 0

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'Plateau':
    """The schedule described by ``config.train.plateau_*``."""
    t = config.train
    if t.plateau_patience < 1 or not 0 < t.plateau_factor < 1:
      raise ValueError(
          f'Bad plateau config: patience={t.plateau_patience} must be >= 1 '
          f'and factor={t.plateau_factor} in (0, 1).')
    return cls(patience=t.plateau_patience, factor=t.plateau_factor,
               max_drops=t.plateau_max_drops, min_delta=t.plateau_min_delta)

  @property
  def scale(self) -> float:
    """Multiplier of the base learning rate."""
    return self.factor ** self.drops

  def update(self, top1: float) -> str:
    """Records one validation result.

    Args:
      top1: validation top-1 accuracy.

    Returns:
      ``'improved'``, ``'waiting'``, ``'dropped'`` (the rate was just divided)
      or ``'exhausted'`` (a plateau after the last allowed drop).
    """
    if top1 > self.best + self.min_delta:
      self.best, self.bad_evals = top1, 0
      return 'improved'
    self.best = max(self.best, top1)
    self.bad_evals += 1
    if self.bad_evals < self.patience:
      return 'waiting'
    self.bad_evals = 0
    if self.drops >= self.max_drops:
      return 'exhausted'
    self.drops += 1
    return 'dropped'

  def state_dict(self) -> dict[str, float]:
    """JSON-serialisable state for checkpoints."""
    return dict(best=self.best, bad_evals=self.bad_evals, drops=self.drops)

  def load_state_dict(self, state: dict[str, Any]) -> None:
    """Restores what ``state_dict`` returned."""
    self.best = float(state['best'])
    self.bad_evals = int(state['bad_evals'])
    self.drops = int(state['drops'])
