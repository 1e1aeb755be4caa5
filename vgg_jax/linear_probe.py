r"""A linear classifier on feature files (the paper's Appendix B protocol).

Command line::

    python -m vgg_jax.linear_probe --train=feats_train.npz \
        --test=feats_test.npz [--l2=1e-4] [--steps=500] [--json=probe.json]

The files are written by ``python -m vgg_jax.extract``. The classifier is an
L2-regularised multinomial logistic regression (weights ``(D, C)`` and a
bias; the penalty ``l2 / 2 * |W|^2`` spares the bias), trained full-batch
from zero weights by L-BFGS (``optax.lbfgs``, default) or by Adam for a fixed
number of steps: the same files give the same classifier. The paper uses a
linear SVM on the same descriptors; a logistic regression is its smooth
counterpart and gives posteriors for top-5. The training features are held
in memory (the paper's datasets have at most tens of thousands of images).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Mapping

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vgg_jax import cli
from vgg_jax import metrics
from vgg_jax import paths

# What vgg_jax.extract writes (see its module docstring).
FEATURE_KEYS = ('features', 'labels', 'index', 'class_names', 'layer',
                'scales')
OPTIMIZERS = ('lbfgs', 'adam')
DEFAULT_L2 = 1e-4
DEFAULT_STEPS = 500
_GRAD_TOL = 1e-6  # L-BFGS stops early once the gradient norm is below this

Probe = dict[str, jax.Array]  # {'kernel': (D, C), 'bias': (C,)}


def load_features(path: str) -> dict[str, Any]:
  """Reads a file written by ``vgg_jax.extract`` into memory.

  Args:
    path: the ``.npz`` file.

  Returns:
    ``{'features': float32 (N, D), 'labels': int32 (N,), 'index': (N,),
    'class_names': list of str, 'layer': str, 'scales': tuple of int}``.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not a feature file (unreadable, a key missing, or features
      and labels of different lengths).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No feature file {path!r}.')
  try:
    data = np.load(path, allow_pickle=False)
  except (OSError, EOFError, ValueError) as e:  # not a zip, or a truncated one
    raise ValueError(f'{path} is not a readable .npz file: {e}') from None
  if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy array
    raise ValueError(f'{path} is not a readable .npz file: it holds one '
                     'array.')
  with data:
    missing = [k for k in FEATURE_KEYS if k not in data.files]
    if missing:
      raise ValueError(f'{path} is not a feature file of vgg_jax.extract: '
                       f'it lacks {", ".join(missing)}.')
    out = {k: data[k] for k in FEATURE_KEYS}
  features, labels = out['features'], out['labels']
  if features.ndim != 2 or labels.shape != (features.shape[0],):
    raise ValueError(f'{path}: features {features.shape} and labels '
                     f'{labels.shape} do not match.')
  out['features'] = features.astype(np.float32)
  out['labels'] = labels.astype(np.int32)
  out['class_names'] = [str(n) for n in out['class_names']]
  out['layer'] = str(out['layer'])
  out['scales'] = tuple(int(q) for q in out['scales'])
  return out


def probe_loss(probe: Probe, features: jax.Array, labels: jax.Array,
               l2: float) -> jax.Array:
  """Mean cross-entropy plus ``l2 / 2 * |kernel|^2`` (the bias is free)."""
  logits = features @ probe['kernel'] + probe['bias']
  penalty = 0.5 * l2 * jnp.sum(jnp.square(probe['kernel']))
  return metrics.cross_entropy(logits, labels).mean() + penalty


@functools.partial(jax.jit, static_argnames=('steps',))
def _lbfgs(probe: Probe, features: jax.Array, labels: jax.Array, l2: float,
           *, steps: int) -> tuple[Probe, jax.Array]:
  """Full-batch L-BFGS with a zoom line search, up to ``steps`` iterations."""
  loss = functools.partial(probe_loss, features=features, labels=labels,
                           l2=l2)
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(carry):
    params, state, i = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad,
                                value_fn=loss)
    return optax.apply_updates(params, updates), state, i + 1

  def running(carry):
    _, state, i = carry
    grad = optax.tree_utils.tree_get(state, 'grad')
    converged = optax.tree_utils.tree_norm(grad) < _GRAD_TOL
    return (i < steps) & ((i == 0) | ~converged)

  probe, _, done = jax.lax.while_loop(running, step,
                                      (probe, opt.init(probe), 0))
  return probe, done


@functools.partial(jax.jit, static_argnames=('steps',))
def _adam(probe: Probe, features: jax.Array, labels: jax.Array, l2: float,
          learning_rate: float, *, steps: int) -> tuple[Probe, jax.Array]:
  """Full-batch Adam for exactly ``steps`` steps."""
  grad_fn = jax.grad(functools.partial(probe_loss, features=features,
                                       labels=labels, l2=l2))
  opt = optax.adam(learning_rate)

  def step(carry, _):
    params, state = carry
    updates, state = opt.update(grad_fn(params), state, params)
    return (optax.apply_updates(params, updates), state), None

  (probe, _), _ = jax.lax.scan(step, (probe, opt.init(probe)), None,
                               length=steps)
  return probe, jnp.asarray(steps)


def train_linear_probe(features: np.ndarray, labels: np.ndarray, *,
                       num_classes: int | None = None, l2: float = DEFAULT_L2,
                       steps: int = DEFAULT_STEPS, optimizer: str = 'lbfgs',
                       learning_rate: float = 1e-2) -> Probe:
  """Fits the logistic regression on all examples at once, from zero.

  Args:
    features: ``(N, D)`` descriptors.
    labels: ``(N,)`` int in ``[0, num_classes)``.
    num_classes: C; None: ``max(labels) + 1``.
    l2: the penalty on the kernel (>= 0).
    steps: L-BFGS iterations at most (it stops earlier once converged), or
      Adam steps exactly.
    optimizer: ``'lbfgs'`` or ``'adam'``.
    learning_rate: Adam's (L-BFGS uses its line search).

  Returns:
    ``{'kernel': (D, C), 'bias': (C,)}`` float32.

  Raises:
    ValueError: bad shapes, labels or settings.
  """
  features = np.asarray(features, np.float32)
  labels = np.asarray(labels, np.int32)
  num_classes = int(num_classes or labels.max(initial=-1) + 1)
  _check_training(features, labels, num_classes, l2, steps, optimizer)
  probe = {'kernel': jnp.zeros((features.shape[1], num_classes), jnp.float32),
           'bias': jnp.zeros((num_classes,), jnp.float32)}
  data = (jnp.asarray(features), jnp.asarray(labels), jnp.float32(l2))
  if optimizer == 'lbfgs':
    probe, done = _lbfgs(probe, *data, steps=steps)
  else:
    probe, done = _adam(probe, *data, jnp.float32(learning_rate),
                        steps=steps)
  logging.info('linear probe: %s, %d steps, loss %.4f', optimizer, int(done),
               float(probe_loss(probe, *data)))
  return probe


def _check_training(features: np.ndarray, labels: np.ndarray,
                    num_classes: int, l2: float, steps: int,
                    optimizer: str) -> None:
  """Raises ValueError naming the first bad input to ``train_linear_probe``."""
  if features.ndim != 2 or labels.shape != (features.shape[0],):
    raise ValueError(f'Features {features.shape} and labels {labels.shape} '
                     'do not match: need (N, D) and (N,).')
  if not len(labels):
    raise ValueError('No training examples.')
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f'Labels must lie in [0, {num_classes}); got '
                     f'{labels.min()}..{labels.max()}.')
  if l2 < 0 or steps <= 0:
    raise ValueError(f'Need l2 >= 0 and steps > 0, got {l2} and {steps}.')
  if optimizer not in OPTIMIZERS:
    raise ValueError(f'Unknown optimizer {optimizer!r}; valid: '
                     f'{", ".join(OPTIMIZERS)}.')


def evaluate_linear_probe(probe: Probe, features: np.ndarray,
                          labels: np.ndarray, *, k: int = metrics.TOP_K
                          ) -> dict[str, float]:
  """Top-1 and top-k accuracy of the probe.

  Args:
    probe: from ``train_linear_probe``.
    features: ``(N, D)``, with D the probe's.
    labels: ``(N,)`` int.
    k: the top-k (clipped to the number of classes).

  Returns:
    ``{'top1': ..., 'top5': ..., 'num_examples': N}`` (accuracies in [0, 1];
    the key is ``f'top{k}'``).
  """
  features = jnp.asarray(features, jnp.float32)
  if features.ndim != 2 or features.shape[1] != probe['kernel'].shape[0]:
    raise ValueError(f'Features {tuple(features.shape)} do not fit a probe '
                     f'of dimension {probe["kernel"].shape[0]}.')
  labels = np.asarray(labels, np.int32)
  num_classes = probe['bias'].shape[0]
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f'Labels must lie in [0, {num_classes}) for this '
                     f'probe; got {labels.min()}..{labels.max()}.')
  scores = features @ probe['kernel'] + probe['bias']
  labels = jnp.asarray(labels)
  top1, topk, count = metrics.topk_hits(
      scores, labels, jnp.ones(labels.shape, bool), k)
  count = max(int(count), 1)
  return {'top1': int(top1) / count, f'top{k}': int(topk) / count,
          'num_examples': int(labels.shape[0])}


def _check_pair(train: Mapping[str, Any], test: Mapping[str, Any]) -> None:
  """Raises ValueError unless the test file fits a probe of the train file."""
  d_train, d_test = train['features'].shape[1], test['features'].shape[1]
  if d_train != d_test:
    raise ValueError(f'Feature dimensions differ: train has D={d_train}, '
                     f'test has D={d_test} (extract both with one --layer '
                     'and net).')
  if len(test['class_names']) != len(train['class_names']):
    raise ValueError(f'Class counts differ: train has '
                     f'{len(train["class_names"])}, test '
                     f'{len(test["class_names"])}.')
  if train['layer'] != test['layer']:
    logging.warning('Train features are %s, test features %s.',
                    train['layer'], test['layer'])


def run_probe(train_path: str, test_path: str, **options) -> dict[str, Any]:
  """Trains on one feature file and tests on another.

  Args:
    train_path: training features (``vgg_jax.extract``).
    test_path: test features, of the same layer and dimension.
    **options: ``train_linear_probe``'s keywords (``l2``, ``steps``, ...).

  Returns:
    The test ``top1``/``top5``/``num_examples``, ``train_top1`` and the
    settings, JSON-ready.
  """
  train, test = load_features(train_path), load_features(test_path)
  _check_pair(train, test)
  probe = train_linear_probe(train['features'], train['labels'],
                             num_classes=len(train['class_names']) or None,
                             **options)
  result = evaluate_linear_probe(probe, test['features'], test['labels'])
  result['train_top1'] = evaluate_linear_probe(
      probe, train['features'], train['labels'])['top1']
  result.update(train=train_path, test=test_path, layer=train['layer'],
                dim=int(train['features'].shape[1]),
                num_classes=int(probe['bias'].shape[0]),
                num_train=int(train['features'].shape[0]), **options)
  return result


def define_flags(flag_values: flags.FlagValues) -> None:
  """The flags of ``python -m vgg_jax.linear_probe``.

  Args:
    flag_values: where to register them.
  """
  flags.DEFINE_string('train', None, 'Training feature file (.npz from '
                      'vgg_jax.extract).', required=True,
                      flag_values=flag_values)
  flags.DEFINE_string('test', None, 'Test feature file.', required=True,
                      flag_values=flag_values)
  flags.DEFINE_float('l2', DEFAULT_L2, 'L2 penalty on the weights.',
                     flag_values=flag_values)
  flags.DEFINE_integer('steps', DEFAULT_STEPS, 'L-BFGS iterations at most, '
                       'or Adam steps.', flag_values=flag_values)
  flags.DEFINE_enum('optimizer', 'lbfgs', OPTIMIZERS, 'Full-batch optimiser.',
                    flag_values=flag_values)
  flags.DEFINE_float('learning_rate', 1e-2, 'Adam\'s learning rate.',
                     flag_values=flag_values)
  flags.DEFINE_string('json', None, 'Also write the result to this JSON file.',
                      flag_values=flag_values)


def main(flag_values: flags.FlagValues) -> int:
  """``python -m vgg_jax.linear_probe``; the exit code.

  Args:
    flag_values: parsed ``define_flags`` flags.
  """
  options = dict(l2=flag_values.l2, steps=flag_values.steps,
                 optimizer=flag_values.optimizer)
  if flag_values.optimizer == 'adam':
    options['learning_rate'] = flag_values.learning_rate
  result = run_probe(flag_values.train, flag_values.test, **options)
  print(f'linear probe ({result["layer"]}, D={result["dim"]}, '
        f'{result["num_classes"]} classes, {result["num_train"]} train): '
        f'top-1 {100 * result["top1"]:.2f}%  top-5 '
        f'{100 * result["top5"]:.2f}%  on {result["num_examples"]} test')
  if flag_values.json:
    paths.write_json(flag_values.json, result, indent=2)
  return 0


if __name__ == '__main__':
  cli.run(define_flags, main)
