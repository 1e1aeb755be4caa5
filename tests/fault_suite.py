r"""The fault-injection suite: every fault of the Reliability table, one run.

    .venv/bin/python tests/fault_suite.py [--kills=10] [--skip_loop]
        [--skip_tests]

Runs the fault tests (``tests/test_faults_data.py``,
``tests/test_faults_train.py`` and the bad-image tests of
``tests/test_bad_data.py``) under pytest, then a restart loop that pytest
does not run (it takes minutes): a training run with Grain workers is killed
with ``kill -9`` at random moments and resumed, ``--kills`` times; every
killed process tree must be gone within 10 s, so exactly one tree is alive
at the end, and the final parameters must equal an uninterrupted run's bit
for bit. Prints a Markdown table (fault | outcome | guarantee | test) for
the README and exits non-zero if anything failed.
"""

import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

from absl import app
from absl import flags
import jax
import numpy as np

TESTS = pathlib.Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))

# pylint: disable=g-import-not-at-top,wrong-import-position
import conftest
import test_faults_train as train_faults
from vgg_jax import weights
from vgg_jax.datasets import testing
# pylint: enable=g-import-not-at-top,wrong-import-position

_DATA = 'tests/test_faults_data.py::'
_BAD = 'tests/test_bad_data.py::'
_TRAIN = 'tests/test_faults_train.py::'
_LOOP = 'fault_suite.py restart loop'

# (fault, outcome when the tests pass, guarantee, tests).
FAULTS = [
    ('`kill -9`, SIGTERM or Ctrl-C of a training or evaluation process',
     'survived', 'its Grain workers exit within 10 s; no orphans',
     [_DATA + 'test_workers_end_with_a_killed_parent']),
    ('An exception in, or the normal end of, the main process', 'clear error',
     'workers exit with it; one traceback, no worker noise',
     [_DATA + 'test_workers_end_with_their_parent']),
    ('A data worker fails (a damaged dataset file)', 'clear error',
     'one error naming the file and what to do; no `handle is closed` or '
     'broken-pipe tracebacks',
     [_DATA + 'test_a_failing_worker_gives_one_clear_error']),
    ('`kill -9` during dataset preparation (CLI or first training run)',
     'survived', 'the rerun completes; a half-written dataset is never read',
     [_DATA + 'test_killed_preparation_is_redone_on_the_next_run']),
    ('Two processes prepare one dataset in a shared `data_dir` at once',
     'survived', 'one complete dataset, no error (the second waits)',
     [_DATA + 'test_concurrent_preparations_make_one_dataset']),
    ('Undecodable training images', 'survived',
     'skipped, counted and logged',
     [_BAD + 'test_training_skips_bad_records_counts_and_logs_them']),
    ('Unreadable evaluation records', 'survived',
     'masked out, each reported once',
     [_BAD + 'test_eval_reports_each_unreadable_record_once']),
    ('A decompression bomb', 'clear error',
     'rejected; the message quotes `input.max_image_pixels`',
     [_BAD + 'test_image_limit_quotes_the_configured_limit']),
    ('Damaged latest checkpoint (truncated or missing array file, missing or '
     'unparsable metadata)', 'survived (steps after the older checkpoint '
     'are trained again)',
     'found before training; one log line names the checkpoint and the '
     'file; resumes from the newest intact checkpoint with a warning, the '
     'damaged one moved to `damaged_checkpoints/`',
     [_TRAIN + 'test_find_damage_names_the_file',
      _TRAIN + 'test_unfinished_saves_are_not_checkpoints',
      _TRAIN + 'test_damaged_latest_falls_back_to_the_newest_intact']),
    ('The same with `train.strict_resume=True`', 'clear error',
     'refuses to fall back; one error line naming the file',
     [_TRAIN + 'test_strict_resume_refuses_to_fall_back',
      _TRAIN + 'test_a_damaged_checkpoint_under_strict_resume_is_one_error_'
      'line']),
    ('Every checkpoint of a workdir damaged', 'clear error',
     'never a silent restart from scratch',
     [_TRAIN + 'test_every_checkpoint_damaged_is_an_error_not_a_new_run']),
    ('A workdir whose checkpoint was written by another model',
     'clear error', 'refused before any array is read (no fallback)',
     [_TRAIN + 'test_another_models_checkpoint_stays_an_error']),
    ('`evaluate`, `predict` or `init_from` on a damaged checkpoint',
     'clear error', 'one line naming the checkpoint and the file',
     [_TRAIN + 'test_evaluate_predict_and_init_from_name_the_bad_file']),
    ('The training loss becomes NaN', 'clear error',
     'one error line from `python -m vgg_jax.main`, no traceback; the last '
     'good checkpoint is kept',
     [_TRAIN + 'test_a_non_finite_loss_is_one_error_line']),
    ('Disk full while saving a checkpoint', 'clear error',
     'one error line naming the step and the cause; the previous checkpoint '
     'is intact and a rerun resumes from it',
     [_TRAIN + 'test_a_full_disk_stops_with_the_step_and_keeps_the_last_'
      'checkpoint']),
    ('`kill -9` of one of two training processes', 'clear error',
     'the other exits with one error line within `train.peer_timeout_s`; '
     'both restarted resume from the newest checkpoint',
     [_TRAIN + 'test_a_killed_peer_ends_the_other_within_the_timeout']),
    ('A process of a two-process run never starts', 'clear error',
     'the other exits with one error line within `train.peer_timeout_s`',
     [_TRAIN + 'test_a_peer_that_never_arrives_ends_the_other_within_the_'
      'timeout']),
]


def run_tests(node_ids: list[str]) -> dict[str, str]:
  """Runs the tests; returns {test function node id: passed/failed/...}."""
  with tempfile.TemporaryDirectory() as tmp:
    report = os.path.join(tmp, 'report.xml')
    subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p',
                    'no:cacheprovider', f'--junitxml={report}', *node_ids],
                   cwd=REPO, check=False)
    outcomes: dict[str, str] = {}
    for case in ET.parse(report).getroot().iter('testcase'):
      module = case.get('classname', '').replace('.', '/') + '.py'
      name = case.get('name', '').split('[')[0]  # parameters merged
      outcome = 'passed'
      for tag in ('failure', 'error', 'skipped'):
        if case.find(tag) is not None:
          outcome = 'skipped' if tag == 'skipped' else 'failed'
      key = f'{module}::{name}'
      if outcomes.get(key) != 'failed':
        outcomes[key] = outcome
  return outcomes


# --------------------------------------------------------------------------
# The restart loop.

def _loop_config(tmp: pathlib.Path) -> pathlib.Path:
  """A config file: the tiny config with Grain workers, frequent checkpoints."""
  idx = tmp / 'idx'
  idx.mkdir()
  testing.write_idx_files(idx, {'train': conftest.learnable_images(160, 0),
                                'test': conftest.learnable_images(40, 1)})
  config = conftest.make_tiny_config(str(idx), str(tmp / 'tfds'))
  return train_faults.config_file(
      tmp / 'loop_config.py', config, data__num_workers=2,
      train__max_steps=10 ** 6, train__log_every_steps=1,
      train__checkpoint_every_steps=2)


def _start(config_file, workdir, log_path, *args):
  log = open(log_path, 'w')
  process = subprocess.Popen(
      [sys.executable, '-m', 'vgg_jax.main', f'--config={config_file}',
       f'--workdir={workdir}', *args], cwd=REPO, stdout=log,
      stderr=subprocess.STDOUT, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  log.close()
  return process


_STEP = re.compile(r'step (\d+)/')


def _steps_logged(log_path) -> list[int]:
  return [int(m.group(1)) for m in _STEP.finditer(
      pathlib.Path(log_path).read_text(errors='replace'))]


def restart_loop(kills: int) -> tuple[bool, str]:
  """Kills and resumes a run ``kills`` times; returns (ok, what happened)."""
  rng = random.Random(0)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    config_file = _loop_config(tmp)
    workdir = tmp / 'run'
    killed_trees: list[list[int]] = []
    for i in range(kills):
      log_path = tmp / f'run{i}.log'
      process = _start(config_file, workdir, log_path)
      wanted = rng.randint(1, 6)  # new steps before the kill
      deadline = time.monotonic() + 600
      while len(_steps_logged(log_path)) < wanted:
        if process.poll() is not None or time.monotonic() > deadline:
          process.kill()
          return False, (f'run {i} ended early: '
                         f'{log_path.read_text()[-2000:]}')
        time.sleep(0.05)
      time.sleep(rng.uniform(0, 0.5))  # sometimes during a checkpoint write
      tree = [process.pid, *conftest.descendants(process.pid)]
      os.kill(process.pid, signal.SIGKILL)
      process.wait()
      killed_trees.append(tree)
      deadline = time.monotonic() + 10
      while any(conftest.alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.2)
      left = [p for p in tree if conftest.alive(p)]
      if left:
        return False, f'kill {i + 1}: processes {left} outlived 10 s'
    # The last resume: the only live tree; then it runs to the end.
    final_steps = max(_steps_logged(tmp / f'run{kills - 1}.log')) + 4
    process = _start(config_file, workdir, tmp / 'final.log',
                     f'--config.train.max_steps={final_steps}')
    time.sleep(5)
    orphans = [p for tree in killed_trees for p in tree if conftest.alive(p)]
    status = process.wait(timeout=900)
    if orphans or status != 0:
      return False, (f'orphans {orphans}, final status {status}: '
                     f'{(tmp / "final.log").read_text()[-2000:]}')
    uninterrupted = _start(config_file, tmp / 'straight',
                           tmp / 'straight.log',
                           f'--config.train.max_steps={final_steps}')
    if uninterrupted.wait(timeout=900) != 0:
      return False, f'uninterrupted run: {(tmp / "straight.log").read_text()}'
    resumed, _, meta = weights.load_variables(str(workdir))
    straight, _, _ = weights.load_variables(str(tmp / 'straight'))
    same = jax.tree.structure(resumed) == jax.tree.structure(straight) and all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(resumed),
                                             jax.tree.leaves(straight)))
    if not same:
      return False, 'final parameters differ from an uninterrupted run'
    return True, (f'{kills} kills, {sum(len(t) for t in killed_trees)} '
                  f'processes killed and gone, one live tree; step '
                  f'{meta["step"]} bit-identical to an uninterrupted run')


_KILLS = flags.DEFINE_integer('kills', 10, 'Kills in the restart loop.')
_SKIP_LOOP = flags.DEFINE_bool('skip_loop', False, 'Skip the restart loop.')
_SKIP_TESTS = flags.DEFINE_bool('skip_tests', False, 'Skip the pytest part.')


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  node_ids = [t for _, _, _, tests in FAULTS for t in tests]
  start = time.monotonic()
  outcomes = {} if _SKIP_TESTS.value else run_tests(node_ids)
  rows = []
  for fault, outcome, guarantee, tests in FAULTS * (not _SKIP_TESTS.value):
    results = [outcomes.get(t, 'not run') for t in tests]
    if any(r != 'passed' for r in results):
      outcome = 'FAILED: ' + ', '.join(sorted(set(results)))
    names = ', '.join(f'`{t.split("::")[-1]}`' for t in tests)
    rows.append((fault, outcome, guarantee, names))
  if not _SKIP_LOOP.value:
    ok, what = restart_loop(_KILLS.value)
    rows.append((f'`kill -9` of training at random moments (also during an '
                 f'async checkpoint write), resumed, {_KILLS.value} times',
                 'survived' if ok else f'FAILED: {what}',
                 'no orphaned workers (exactly one live process tree); the '
                 'final parameters equal an uninterrupted run\'s bit for '
                 'bit' + (f' ({what})' if ok else ''), f'`{_LOOP}`'))
  print('\n| Fault | Outcome | Guarantee | Test |')
  print('|---|---|---|---|')
  for row in rows:
    print('| ' + ' | '.join(row) + ' |')
  print(f'\n{len(rows)} faults in {time.monotonic() - start:.0f} s on '
        f'{os.cpu_count()} CPU cores.')
  return 0 if all(not r[1].startswith('FAILED') for r in rows) else 1


if __name__ == '__main__':
  app.run(main)
