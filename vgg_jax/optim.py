"""The paper's optimiser: SGD with momentum, L2 weight decay, plateau schedule.

Sec. 3.1: mini-batch SGD, momentum 0.9, weight decay 5e-4, learning rate 1e-2
divided by 10 when the validation accuracy stopped improving (three times).
The learning rate is applied outside the Optax chain (``p -= lr * update``), as
in Caffe and PyTorch, so a plateau drop acts on the next step without touching
the momentum buffer and the rate can be fed to the jitted step as a scalar.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
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


def base_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int,
                  total_steps: int) -> Callable[[int], float]:
  """The step-indexed learning rate before any plateau drops.

  Args:
    config: the run config (``train.schedule``, ``train.learning_rate``,
      ``train.warmup_epochs``, ``train.step_boundaries_epochs``).
    steps_per_epoch: optimiser steps in one epoch.
    total_steps: length of the run, for cosine.

  Returns:
    A function of the integer step.
  """
  t = config.train
  if t.schedule not in SCHEDULES:
    raise ValueError(f'Unknown train.schedule {t.schedule!r}; valid: '
                     f'{", ".join(SCHEDULES)}.')
  if t.learning_rate <= 0:
    raise ValueError(f'Bad train.learning_rate {t.learning_rate}: must be > 0.')
  lr = float(t.learning_rate)
  warmup = int(round(t.warmup_epochs * steps_per_epoch))

  def schedule(step: int) -> float:
    if step < warmup:
      return lr * (step + 1) / warmup
    if t.schedule == 'plateau':
      return lr
    if t.schedule == 'step':
      drops = sum(step >= b * steps_per_epoch for b in t.step_boundaries_epochs)
      return lr * 0.1 ** drops
    progress = (step - warmup) / max(1, total_steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
  return schedule


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


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)
