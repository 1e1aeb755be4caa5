r"""A transfer experiment on the embedded Fashion-MNIST (the paper's Sec. 4.3).

Pre-trains the quickstart net on classes 0-4 (T-shirt, trouser, pullover,
dress, coat), then learns classes 5-9 (sandal, shirt, sneaker, bag, ankle
boot) four ways and tests each on the 5,000 test images of classes 5-9:

- ``probe``: the paper's protocol: relu7 features of the pre-trained net
  (``vgg_jax.extract``, Q = 32 with the mirror image, L2-normalised) and a
  logistic regression on them (``vgg_jax.linear_probe``);
- ``frozen_trunk``: fine-tuning with the conv trunk and its BN statistics
  frozen (``train.freeze=trunk``), FC-6/FC-7 copied, FC-8 new;
- ``full``: fine-tuning every layer, FC-8 new and 10x faster;
- ``scratch``: the same net and step count from random weights.

One command, resumable step by step (each finished step is recorded in
``OUT/results.json``; a rerun skips it, and an interrupted training resumes
from its checkpoint), writing ``OUT/results.md``::

    python -m vgg_jax.transfer                 # ~10 min on 2 cores
    python -m vgg_jax.transfer --budget=tiny   # seconds, to try it

The same runs from the command line, for the full budget (``W=workdirs``)::

    python -m vgg_jax.main --config=configs/quickstart.py --workdir=$W/pretrain \
        --config.data.classes=0,1,2,3,4 --config.model.num_classes=5 ...
    python -m vgg_jax.extract --workdir=$W/pretrain --split=train \
        --config.data.classes=5,6,7,8,9 --scales=32 --output=$W/train.npz
    python -m vgg_jax.linear_probe --train=$W/train.npz --test=$W/test.npz
    python -m vgg_jax.main ... --config.train.init_from=$W/pretrain \
        --config.train.init_layers=trunk,fc6,fc7 --config.train.freeze=trunk

(``transfer_config`` holds every field the script sets.)
"""

from __future__ import annotations

from vgg_jax import host_memory

if __name__ == '__main__':  # first: glibc reads its tunables at start-up
  host_memory.reexec_with_huge_pages()

# pylint: disable=g-import-not-at-top,wrong-import-position
import copy
import dataclasses
import sys
import time
from typing import Any

from absl import flags
from absl import logging
from etils import epath
import ml_collections
from ml_collections import config_flags

from vgg_jax import cli
from vgg_jax import eval_plan
from vgg_jax import extract
from vgg_jax import linear_probe
from vgg_jax import paths
from vgg_jax import train

SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
METHODS = ('probe', 'frozen_trunk', 'full', 'scratch')
RESULTS_JSON = 'results.json'


@dataclasses.dataclass(frozen=True)
class Budget:
  """How long each run trains.

  Attributes:
    width_multiplier: the net's width.
    pretrain_steps: steps on classes 0-4.
    transfer_steps: steps of each training on classes 5-9.
    batch_size: training batch.
    eval_batch_size: test (and extraction) batch.
    learning_rate: from scratch (pre-training and ``scratch``).
    finetune_learning_rate: fine-tuning; FC-8 learns 10x faster.
  """
  width_multiplier: float
  pretrain_steps: int
  transfer_steps: int
  batch_size: int
  eval_batch_size: int
  learning_rate: float
  finetune_learning_rate: float


BUDGETS = {
    # 3 epochs of the 30k source images, 1 epoch of the 30k target ones.
    'full': Budget(1 / 8, 703, 234, 128, 500, 0.05, 0.005),
    'tiny': Budget(1 / 16, 4, 2, 16, 8, 0.01, 0.001),
}


def transfer_config(method: str, base_config: ml_collections.ConfigDict,
                    budget: Budget, workdir_root: epath.Path
                    ) -> ml_collections.ConfigDict:
  """The training config of ``pretrain`` or of a method that trains.

  Args:
    method: ``pretrain``, ``frozen_trunk``, ``full`` or ``scratch``.
    base_config: the net, data and input (``configs/quickstart.py``).
    budget: the budget.
    workdir_root: where the runs' workdirs are (``pretrain`` among them).
  """
  config = copy.deepcopy(base_config)
  config.data.classes = (SOURCE_CLASSES if method == 'pretrain'
                         else TARGET_CLASSES)
  config.model.num_classes = len(config.data.classes)
  config.model.width_multiplier = budget.width_multiplier
  t = config.train
  steps = (budget.pretrain_steps if method == 'pretrain'
           else budget.transfer_steps)
  t.batch_size, t.eval_batch_size = budget.batch_size, budget.eval_batch_size
  t.max_steps = steps
  t.schedule, t.step_boundaries_epochs = 'step', ()
  t.eval_every_steps = t.checkpoint_every_steps = steps  # one test, at the end
  t.log_every_steps = max(1, min(50, steps))
  t.learning_rate = budget.learning_rate
  if method in ('frozen_trunk', 'full'):
    t.init_from = str(workdir_root / 'pretrain')
    t.init_layers = 'trunk,fc6,fc7'  # FC-8 maps to other classes: new
    t.freeze = 'trunk' if method == 'frozen_trunk' else 'none'
    t.learning_rate = budget.finetune_learning_rate
    t.new_layers_lr_mult = 10.0
  return config


def train_run(name: str, config: ml_collections.ConfigDict,
              workdir_root: epath.Path) -> dict[str, Any] | None:
  """Trains (or resumes) one run; its test result (None: preempted)."""
  start = time.monotonic()
  summary = train.train_and_evaluate(config, str(workdir_root / name))
  if summary['stopped'] != 'done':
    return None
  return dict(top1=summary['val_top1'], top5=summary['val_top5'],
              steps=summary['step'], seconds=time.monotonic() - start)


def probe_run(budget: Budget, workdir_root: epath.Path) -> dict[str, Any]:
  """Features of the pre-trained net on classes 5-9 and a linear probe."""
  start = time.monotonic()
  member = eval_plan.load_member(str(workdir_root / 'pretrain'))
  member.config.data.classes = TARGET_CLASSES
  normalization, mean_rgb = member.normalization_spec()
  files = {}
  for split in ('train', 'test'):
    files[split] = str(workdir_root / f'features_{split}.npz')
    extract.extract_features(
        member.model, member.config, files[split], split=split,
        scales=(member.config.input.crop_size,),
        batch_size=budget.eval_batch_size, normalization=normalization,
        mean_rgb=mean_rgb, overwrite=True)
  result = linear_probe.run_probe(files['train'], files['test'])
  return dict(top1=result['top1'], top5=result['top5'],
              train_top1=result['train_top1'], steps=None,
              seconds=time.monotonic() - start)


def read_results(out_dir: epath.Path) -> dict[str, Any]:
  return paths.read_json(out_dir / RESULTS_JSON, default={})


def run_transfer(base_config: ml_collections.ConfigDict, out_dir: str,
                 workdir_root: str, *, budget: str = 'full'
                 ) -> dict[str, Any]:
  """Runs the steps not yet in ``OUT/results.json``; writes ``results.md``.

  Args:
    base_config: the net, data and input (``configs/quickstart.py``).
    out_dir: where results.json and results.md go.
    workdir_root: where each run trains (``ROOT/pretrain``, ...).
    budget: a key of ``BUDGETS``.

  Returns:
    The results, keyed by ``pretrain`` and the methods; incomplete when a
    training was preempted (a rerun continues).
  """
  if budget not in BUDGETS:
    raise ValueError(f'Unknown budget {budget!r}; valid: '
                     f'{", ".join(BUDGETS)}.')
  out, root = paths.absolute(out_dir), paths.absolute(workdir_root)
  results = read_results(out)
  if results and results.get('budget') != budget:
    raise ValueError(f'{out / RESULTS_JSON} holds a {results["budget"]!r} '
                     'run; use another --out (and --workdir_root).')
  results['budget'] = budget
  for name in ('pretrain', *METHODS):
    if name in results:
      continue
    logging.info('Transfer: %s', name)
    if name == 'probe':
      record = probe_run(BUDGETS[budget], root)
    else:
      record = train_run(name, transfer_config(
          name, base_config, BUDGETS[budget], root), root)
    if record is None:
      print(f'{name} was stopped; rerun the same command to continue.')
      return results
    results[name] = record
    paths.write_json(out / RESULTS_JSON, results, indent=1, sort_keys=True)
  (out / 'results.md').write_text(report(results))
  return results


_LABELS = {
    'probe': 'linear probe on relu7 features (Appendix B protocol)',
    'frozen_trunk': 'fine-tune, conv trunk frozen',
    'full': 'fine-tune everything',
    'scratch': 'from scratch, same steps',
}


def report(results: dict[str, Any]) -> str:
  """The Markdown table of a finished run."""
  pre = results['pretrain']
  lines = [
      f'Pre-training on classes 0-4: {pre["steps"]} steps, '
      f'{pre["top1"]:.2%} top-1 on their test images, {pre["seconds"]:.0f} s.',
      '', '| classes 5-9 (5,000 test images) | test top-1 | steps | wall time |',
      '|---|---|---|---|']
  for name in METHODS:
    r = results[name]
    steps = 'extraction + L-BFGS' if r['steps'] is None else r['steps']
    lines.append(f'| {_LABELS[name]} | {r["top1"]:.2%} | {steps} | '
                 f'{r["seconds"]:.0f} s |')
  return '\n'.join(lines) + '\n'


def define_flags(flag_values: flags.FlagValues) -> None:
  """The flags of ``python -m vgg_jax.transfer``.

  Args:
    flag_values: where to register them.
  """
  flags.DEFINE_enum('budget', 'full', list(BUDGETS), 'full: ~10 min on 2 '
                    'cores; tiny: seconds, to try the command.',
                    flag_values=flag_values)
  flags.DEFINE_string('out', 'docs/transfer', 'results.json and results.md '
                      'go here.', flag_values=flag_values)
  flags.DEFINE_string('workdir_root', 'workdirs/transfer',
                      'Each run trains in WORKDIR_ROOT/<run>.',
                      flag_values=flag_values)
  config_flags.DEFINE_config_file(
      'config', 'configs/quickstart.py', 'The net, data and input; '
      '--config.field=value overrides a field.', lock_config=False,
      sys_argv=list(sys.argv), flag_values=flag_values)


def main(flag_values: flags.FlagValues) -> int:
  """``python -m vgg_jax.transfer``; returns the exit code.

  Args:
    flag_values: parsed ``define_flags`` flags.
  """
  logging.set_verbosity(logging.INFO)
  results = run_transfer(flag_values.config, flag_values.out,
                         flag_values.workdir_root, budget=flag_values.budget)
  if all(name in results for name in METHODS):
    print(report(results), end='')
  return 0


if __name__ == '__main__':
  cli.run(define_flags, main)
