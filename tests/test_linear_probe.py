"""The linear classifier on feature files."""

import json

import numpy as np
import pytest

from vgg_jax import cli
from vgg_jax import linear_probe


def separable(n, dim=12, classes=6, seed=0):
  """Unit-norm features around one direction per class, and their labels."""
  rng = np.random.RandomState(seed)
  centres = np.linalg.qr(rng.randn(dim, dim))[0][:classes] * 3.0
  labels = rng.randint(0, classes, n).astype(np.int32)
  x = centres[labels] + 0.4 * rng.randn(n, dim)
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), \
      labels


def write_features(path, features, labels, classes=6, layer='relu7'):
  """A feature file as ``vgg_jax.extract`` writes it."""
  np.savez(path, features=features, labels=labels,
           index=np.arange(len(labels), dtype=np.int32),
           class_names=np.asarray([f'c{i}' for i in range(classes)]),
           layer=np.asarray(layer), scales=np.asarray([32], np.int32))
  return str(path)


@pytest.mark.parametrize('optimizer', ['lbfgs', 'adam'])
def test_separable_features_are_learnt_deterministically(optimizer):
  x, y = separable(300)
  kwargs = dict(num_classes=6, steps=200, optimizer=optimizer,
                learning_rate=0.1)
  probe = linear_probe.train_linear_probe(x[:200], y[:200], **kwargs)
  result = linear_probe.evaluate_linear_probe(probe, x[200:], y[200:])
  assert result['top1'] >= 0.97 and result['top5'] == 1.0
  assert result['num_examples'] == 100
  again = linear_probe.train_linear_probe(x[:200], y[:200], **kwargs)
  np.testing.assert_array_equal(np.asarray(probe['kernel']),
                                np.asarray(again['kernel']))
  assert probe['kernel'].shape == (12, 6) and probe['bias'].shape == (6,)


def test_lbfgs_reaches_the_regularised_optimum():
  x, y = separable(200, seed=1)
  probe = linear_probe.train_linear_probe(x, y, l2=1e-2, steps=500)
  loss = lambda p: float(linear_probe.probe_loss(p, x, y, 1e-2))
  # The gradient vanishes: a nudge in any direction raises the loss.
  rng = np.random.RandomState(0)
  for _ in range(3):
    nudged = {k: v + 1e-2 * rng.randn(*v.shape) for k, v in probe.items()}
    assert loss(nudged) > loss(probe)


def test_a_stronger_penalty_gives_smaller_weights():
  x, y = separable(200, seed=2)
  norms = [float(np.linalg.norm(linear_probe.train_linear_probe(
      x, y, l2=l2, steps=200)['kernel'])) for l2 in (1e-4, 1e-1)]
  assert norms[1] < 0.5 * norms[0]


def test_cli_prints_one_line_and_writes_json(tmp_path, capsys):
  x, y = separable(300, seed=3)
  train = write_features(tmp_path / 'train.npz', x[:200], y[:200])
  test = write_features(tmp_path / 'test.npz', x[200:], y[200:])
  out = tmp_path / 'probe.json'
  code = cli.call(linear_probe.define_flags, linear_probe.main, [
      f'--train={train}', f'--test={test}', '--l2=1e-3', '--steps=100',
      f'--json={out}'])
  assert code == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 1 and 'top-1' in lines[0] and 'top-5' in lines[0]
  result = json.loads(out.read_text())
  assert result['top1'] >= 0.97 and result['num_examples'] == 100
  assert result['dim'] == 12 and result['num_classes'] == 6
  assert result['num_train'] == 200 and result['l2'] == 1e-3


def test_load_features_reads_what_extract_writes(tmp_path):
  x, y = separable(10)
  feats = linear_probe.load_features(
      write_features(tmp_path / 'f.npz', x, y, layer='pool5'))
  np.testing.assert_array_equal(feats['features'], x)
  np.testing.assert_array_equal(feats['labels'], y)
  assert feats['layer'] == 'pool5' and feats['scales'] == (32,)
  assert feats['class_names'] == [f'c{i}' for i in range(6)]


def _bad_files(tmp_path):
  x, y = separable(40)
  good = write_features(tmp_path / 'good.npz', x, y)
  wide = write_features(tmp_path / 'wide.npz',
                        np.concatenate([x, x], axis=1), y)
  junk = tmp_path / 'junk.npz'
  junk.write_bytes(b'not a zip')
  partial = tmp_path / 'partial.npz'
  np.savez(partial, features=x)
  return good, wide, str(junk), str(partial)


@pytest.mark.parametrize('case,message', [
    ('missing', 'No feature file'),
    ('wide', 'Feature dimensions differ: train has D=12, test has D=24'),
    ('junk', 'not a readable .npz'),
    ('partial', 'lacks labels'),
])
def test_bad_input_exits_1_with_one_line(tmp_path, capsys, case, message):
  good, wide, junk, partial = _bad_files(tmp_path)
  test = {'missing': str(tmp_path / 'nope.npz'), 'wide': wide, 'junk': junk,
          'partial': partial}[case]
  code = cli.call(linear_probe.define_flags, linear_probe.main,
                  [f'--train={good}', f'--test={test}'])
  err = capsys.readouterr().err.strip()
  assert code == 1
  assert len(err.splitlines()) == 1 and message in err, err


def test_bad_training_input_is_refused():
  x, y = separable(20)
  with pytest.raises(ValueError, match='Labels must lie in'):
    linear_probe.train_linear_probe(x, y, num_classes=2)
  with pytest.raises(ValueError, match='do not match'):
    linear_probe.train_linear_probe(x, y[:5])
  with pytest.raises(ValueError, match='Unknown optimizer'):
    linear_probe.train_linear_probe(x, y, optimizer='sgd')
  probe = linear_probe.train_linear_probe(x, y, num_classes=6, steps=5)
  with pytest.raises(ValueError, match='do not fit'):
    linear_probe.evaluate_linear_probe(probe, x[:, :4], y)
