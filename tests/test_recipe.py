"""The paper's chain as one resumable command (vgg_jax.recipe)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from vgg_jax import cli
from vgg_jax import recipe
from vgg_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]
# The tiny config's fields that differ from configs/quickstart.py, less the
# model name (the recipe's --net sets it).
_TINY_FIELDS = ('data.manual_dir', 'data.data_dir', 'data.num_workers',
                'model.width_multiplier', 'train.batch_size',
                'train.eval_batch_size', 'train.max_steps',
                'train.log_every_steps', 'train.eval_every_steps',
                'train.checkpoint_every_steps', 'train.learning_rate')


def _cli_args(config, root, extra=()):
  args = [f'--net=vgg13', f'--root={root}',
          f'--base_config={REPO}/configs/quickstart.py']
  for key in _TINY_FIELDS:
    section, field = key.split('.')
    args.append(f'--config.{key}={config[section][field]}')
  return args + list(extra)


def _one_line_error(capsys):
  err = capsys.readouterr().err
  assert 'Traceback' not in err, err
  lines = [l for l in err.splitlines() if ': error: ' in l]
  assert len(lines) == 1, err
  return lines[0]


def test_plan_chains_net_a_and_the_three_stages(tmp_path):
  steps = recipe.plan('vgg16', str(tmp_path))
  names = [s.name for s in steps]
  assert names == ['vgg11', 'vgg16_s256', 'vgg16_s384', 'vgg16_jitter']
  assert [s.parent and s.parent.name for s in steps] == [
      None, 'vgg11', 'vgg16_s256', 'vgg16_s384']
  assert [s.parent_net for s in steps] == [None, 'vgg11', 'vgg16', 'vgg16']
  assert all(s.workdir.parent == tmp_path for s in steps)


@pytest.mark.parametrize('net, names', [
    ('vgg11', ['vgg11', 'vgg11_s384', 'vgg11_jitter']),
    ('vgg11_lrn', ['vgg11_lrn_s256', 'vgg11_lrn_s384', 'vgg11_lrn_jitter']),
    ('vgg13_5x5', ['vgg13_5x5_s256', 'vgg13_5x5_s384', 'vgg13_5x5_jitter']),
    ('vgg16_bn', ['vgg16_bn_s256', 'vgg16_bn_s384', 'vgg16_bn_jitter'])])
def test_nets_without_a_net_a_stage(net, names, tmp_path):
  steps = recipe.plan(net, str(tmp_path))
  assert [s.name for s in steps] == names
  assert steps[0].parent is None
  config = recipe.stage_config(steps[0], None, None)
  assert config.model.init == ('glorot' if net == 'vgg13_5x5' else 'normal')
  assert config.train.init_from == ''


def test_gs_roots_stay_urls():
  steps = recipe.plan('vgg19', 'gs://bucket/recipes/e')
  assert str(steps[1].workdir) == 'gs://bucket/recipes/e/vgg19_s256'
  assert str(steps[1].parent) == 'gs://bucket/recipes/e/vgg11'


def test_stage_configs_set_scales_lr_and_parent(tmp_path):
  steps = recipe.plan('vgg16', str(tmp_path))
  configs = [recipe.stage_config(s, None, None) for s in steps]
  assert [c.input.eval_scales[0] for c in configs] == [256, 256, 384, 384]
  assert [c.train.learning_rate for c in configs] == [1e-2, 1e-2, 1e-3, 1e-3]
  assert configs[1].train.init_from == str(tmp_path / 'vgg11')
  assert configs[3].train.init_from == str(tmp_path / 'vgg16_s384')


def test_overrides_apply_but_cannot_rechain(tmp_path):
  step = recipe.plan('vgg13_5x5', str(tmp_path))[0]

  def batch(config):
    config.train.batch_size = 64
  assert recipe.stage_config(step, None, batch).train.batch_size == 64

  def rename(config):
    config.model.name = 'vgg16'
  with pytest.raises(ValueError, match='do not override'):
    recipe.stage_config(step, None, rename)

  def paper_init(config):
    config.model.init = 'normal'
  with pytest.raises(ValueError, match='init=glorot'):
    recipe.stage_config(step, None, paper_init)


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
  root = tmp_path / 'root'
  status = cli.call(recipe.define_flags, recipe.main,
                    ['--net=vgg19', f'--root={root}', '--dry_run'])
  assert status == 0
  out = capsys.readouterr().out
  for name in ('vgg11 [pending]', 'vgg19_s256 [pending]',
               'vgg19_s384 [pending]', 'vgg19_jitter [pending]'):
    assert name in out
  assert f'init {root / "vgg19_s256"}' in out  # the jitter stage's parent
  assert 'eval vgg19_jitter_multi [pending]: dense,multi_crop,' in out
  assert not root.exists()


def test_a_root_of_another_net_or_place_is_refused(tmp_path, capsys):
  root = tmp_path / 'root'
  recipe.check_manifest(str(root), 'vgg16', write=True)
  recipe.check_manifest(str(root), 'vgg16', write=True)  # same: fine
  status = cli.call(recipe.define_flags, recipe.main,
                    ['--net=vgg19', f'--root={root}', '--dry_run'])
  assert status == 1
  line = _one_line_error(capsys)
  assert "holds the recipe of 'vgg16'" in line and 'another --root' in line
  moved = tmp_path / 'moved'
  root.rename(moved)
  with pytest.raises(ValueError, match='was written for root'):
    recipe.check_manifest(str(moved), 'vgg16', write=True)


def test_unfinished_or_foreign_parent_is_a_clear_error(tmp_path):
  steps = recipe.plan('vgg13', str(tmp_path))
  parent = tmp_path / 'vgg11'
  with pytest.raises(ValueError, match='no run yet'):
    recipe.check_parent(steps[1])
  (parent / 'checkpoints' / '40').mkdir(parents=True)
  (parent / 'config.json').write_text(json.dumps({'model': {'name': 'vgg11'}}))
  with pytest.raises(ValueError) as e:
    recipe.check_parent(steps[1])
  assert str(parent) in str(e.value) and 'has not finished' in str(e.value)
  assert 'vgg11 run at checkpoint step 40' in str(e.value)
  (parent / recipe.MARKER).write_text(json.dumps({'net': 'vgg11_bn'}))
  with pytest.raises(ValueError, match='holds vgg11_bn, not vgg11'):
    recipe.check_parent(steps[1])
  (parent / recipe.MARKER).write_text(json.dumps({'net': 'vgg11'}))
  recipe.check_parent(steps[1])


def test_results_table_puts_the_papers_numbers_beside(tmp_path):
  steps = recipe.plan('vgg16', str(tmp_path))
  evals = recipe.evaluations(steps)
  result = {'top1_error': 0.25, 'top5_error': 0.075, 'scales': [256, 384, 512],
            'num_examples': 50000, 'train_scales': [256, 512]}
  table = recipe.results_table('vgg16', str(tmp_path), [
      (evals[-1], {p: result for p in evals[-1].protocols})])
  assert ('| Tables 4, 5 | vgg16_jitter | jitter | [256, 512] | 256, 384, 512 '
          '| multi_crop_dense | 25.00 | 7.50 | 24.4 | 7.2 | 50000 |') in table
  assert [e.name for e in evals] == [
      'vgg11_single', 'vgg16_s256_single', 'vgg16_s384_single',
      'vgg16_jitter_single', 'vgg16_s256_multi', 'vgg16_jitter_multi']


def _wait_for(path, proc, log, timeout):
  deadline = time.monotonic() + timeout
  while not path.exists():
    assert proc.poll() is None, log.read_text()[-3000:]
    assert time.monotonic() < deadline, f'{path} did not appear'
    time.sleep(0.2)


@pytest.mark.slow
def test_kill_and_rerun_continues_the_chain(tiny_config, tmp_path,
                                            monkeypatch):
  root = tmp_path / 'root'
  tiny_config.train.max_steps = 4
  tiny_config.train.checkpoint_every_steps = 1
  args = _cli_args(tiny_config, root)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  log = tmp_path / 'recipe.log'  # a file: a full pipe would block the run
  with open(log, 'w') as out:
    proc = subprocess.Popen([sys.executable, '-m', 'vgg_jax.recipe', *args],
                            cwd=REPO, env=env, stdout=out, stderr=out)
    try:
      # Killed (no clean shutdown) once net A is done and B has a checkpoint.
      _wait_for(root / 'vgg11' / recipe.MARKER, proc, log, 600)
      _wait_for(root / 'vgg13_s256' / 'checkpoints' / '1', proc, log, 300)
    finally:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
  assert not (root / recipe.RESULTS).exists()
  marker = (root / 'vgg11' / recipe.MARKER).read_text()

  trained = {}
  real = train.train_and_evaluate

  def spy(config, workdir):
    checkpoints = pathlib.Path(workdir) / 'checkpoints'
    trained[pathlib.Path(workdir).name] = sorted(
        int(p.name) for p in checkpoints.glob('*') if p.name.isdigit()
    ) if checkpoints.exists() else []
    return real(config, workdir)
  monkeypatch.setattr(train, 'train_and_evaluate', spy)
  assert cli.call(recipe.define_flags, recipe.main, args) == 0

  assert 'vgg11' not in trained  # finished: not retrained
  assert (root / 'vgg11' / recipe.MARKER).read_text() == marker
  # The interrupted stage resumed from its checkpoints (unless it finished
  # between the checkpoint and the kill).
  assert (trained.get('vgg13_s256') or [1])[0] >= 1
  assert sorted(trained) in (['vgg13_jitter', 'vgg13_s256', 'vgg13_s384'],
                             ['vgg13_jitter', 'vgg13_s384'])
  for name in ('vgg13_s256', 'vgg13_s384', 'vgg13_jitter'):
    assert json.loads((root / name / recipe.MARKER).read_text())['step'] == 4
  results = (root / recipe.RESULTS).read_text()
  assert '| Table 3 | vgg13_s256 | s256 | 37 | 37 | dense |' in results
  assert '| 28.7 | 9.9 | 40 |' in results  # net B's Table 3 row, 40 images
  assert results.count('| Tables 4, 5 | vgg13_jitter |') == 3
  # A second rerun trains and evaluates nothing.
  trained.clear()
  assert cli.call(recipe.define_flags, recipe.main, args) == 0
  assert not trained


def _train_tpu(*args):
  env = {'PATH': '/usr/bin:/bin', 'HOME': '/tmp', 'BUCKET': 'bkt'}
  return subprocess.run(['bash', str(REPO / 'launch' / 'train_tpu.sh'),
                         '--dry-run', *args], env=env, capture_output=True,
                        text=True, check=False)


def test_tpu_launch_runs_the_recipe_on_a_gs_root():
  done = _train_tpu('--recipe=vgg16', '--', '--config.train.batch_size=512')
  assert done.returncode == 0, done.stderr
  assert ('exec .venv/bin/python -m vgg_jax.recipe --net=vgg16 '
          '--root=gs://bkt/workdirs/recipe_vgg16 '
          '--config.data.data_dir=gs://bkt/tensorflow_datasets '
          '--multiprocess=auto --config.train.batch_size=512') in done.stdout
  # A rerun stops a recipe still running there, as it does vgg_jax.main.
  assert 'vgg_jax[.](main|recipe)' in done.stdout
  both = _train_tpu('--recipe=vgg16', '--config=configs/vgg16.py')
  assert both.returncode == 1 and 'not both' in both.stderr
