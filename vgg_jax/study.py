r"""The paper's comparisons at small scale on the embedded Fashion-MNIST.

One command trains and tests every cell of the study, resumable cell by cell
(a cell is one training run and its evaluations; results are appended to
``OUT/results.json`` as cells finish, and a run cut short continues where it
stopped), then writes ``OUT/results.md`` (a table per claim beside the
paper's numbers, with a verdict) and ``OUT/study.png``::

    python -m vgg_jax.study                      # the whole study, ~90 min
    python -m vgg_jax.study --dry_run            # the cells, done or pending
    python -m vgg_jax.study --report_only        # tables and plot from the JSON

Scale (``BUDGETS['full']``): plain nets (no batch norm) at 1/8 width, 32 px
crops, FC-6 a 1x1 conv, batch 128, two epochs with a fixed step schedule
(x0.1 at 60% and 85% of the epochs, so every cell gets the same budget; the
paper's plateau schedule needs more validations than this budget holds). The
paper's scales become S = 37 (for 256), 55 (384) and [37, 73] (for [256,
512]), test scales the same way (``configs.base.stage_scales``). Every cell
trains from scratch, the jittered and S = 55 cells included, so scale
comparisons are at equal budgets (the paper fine-tunes them from the S = 256
net instead).

Initialisation: He (Kaiming) by default. At this width Glorot halves the
signal's variance at every ReLU layer and a plain VGG-19 stayed at chance for
300 steps (He: 70% top-1 by then), which would turn the depth comparisons
into a race to leave chance. The paper's own two starts are compared on net
D: net A's layers with std 0.01 for the rest (Sec. 3.1) and Glorot (its
footnote).

Single-scale numbers are on the whole test split (10,000 images) with a
centre crop; multi-scale and protocol comparisons on its first ``subset``
images. With a 1x1 FC-6 over a map of 32 px cells, dense evaluation below
Q = 64 has one score position (the top-left 32 px; its mirror the top-right),
so at this size dense is a one-crop protocol and the paper's Table 3 claims
are read from the centre crop (docs/paper.md, Sec. 3).
"""

from __future__ import annotations

from vgg_jax import host_memory

if __name__ == '__main__':  # first: glibc reads its tunables at start-up
  host_memory.reexec_with_huge_pages()

# pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import math
import time
from typing import Any, Sequence

from absl import flags
from absl import logging
from etils import epath
import ml_collections

from vgg_jax import cli
from vgg_jax import evaluate
from vgg_jax import paths
from vgg_jax import study_report
from vgg_jax import train
from vgg_jax.configs import base

RESULTS_JSON = 'results.json'


@dataclasses.dataclass(frozen=True)
class Cell:
  """One training run of the study and what is evaluated on it.

  Attributes:
    name: unique name, e.g. ``D_s0``; also its workdir name.
    net: model name.
    stage: training scales (``configs.base.STAGES``), trained from scratch.
    seed: ``config.seed``.
    init: kernel initialisation of the layers not copied.
    parent: the cell (a net A run) whose layers initialise this one.
    scale_tests: also test at several scales on the subset (Table 4).
    protocol_tests: also compare dense, multi-crop and both (Table 5).
  """
  name: str
  net: str
  stage: str = 's256'
  seed: int = 0
  init: str = 'he'
  parent: str | None = None
  scale_tests: bool = False
  protocol_tests: bool = False


def _seeds(prefix: str, net: str, seeds: int = 2, **kw) -> list[Cell]:
  return [Cell(f'{prefix}_s{s}', net, seed=s, **{
      k: (v.format(seed=s) if isinstance(v, str) else v)
      for k, v in kw.items()}) for s in range(seeds)]


def cells() -> list[Cell]:
  """Every cell, parents first. Two seeds where the paper's gaps are small."""
  return [
      *_seeds('A', 'vgg11'),
      *_seeds('A_LRN', 'vgg11_lrn'),
      *_seeds('B', 'vgg13'),
      *_seeds('B_5x5', 'vgg13_5x5', seeds=1),  # the paper's gap: 7 points
      *_seeds('C', 'vgg16_c'),
      *_seeds('D', 'vgg16', scale_tests=True),
      *_seeds('E', 'vgg19'),
      *_seeds('D_S55', 'vgg16', seeds=1, stage='s384'),
      *_seeds('D_jitter', 'vgg16', stage='jitter', scale_tests=True,
              protocol_tests=True),
      *_seeds('D_from_A', 'vgg16', init='normal', parent='A_s{seed}'),
      *_seeds('D_glorot', 'vgg16', seeds=1, init='glorot'),
  ]


@dataclasses.dataclass(frozen=True)
class Budget:
  """How much each cell trains and tests.

  Attributes:
    width_multiplier: model width.
    num_epochs: training epochs (``max_steps`` <= 0).
    max_steps: if > 0, steps instead of epochs.
    batch_size: training batch.
    eval_batch_size: test batch (divides the test split and the subset).
    subset: test images for multi-scale and protocol tests (0: all).
    validation_split: the split validated on at the end of training.
  """
  width_multiplier: float
  num_epochs: float
  max_steps: int
  batch_size: int
  eval_batch_size: int
  subset: int
  validation_split: str


BUDGETS = {
    # About 75 min on an idle 2-core machine, 110 min beside other jobs
    # (extrapolated from timed 150-300 step runs of A, D and E).
    'full': Budget(1 / 8, 2.0, -1, 128, 500, 1000, 'test[:1000]'),
    # Seconds per cell, for tests and for trying the command.
    'tiny': Budget(1 / 16, 0.0, 2, 16, 8, 0, 'test'),
}


def cell_config(cell: Cell, budget: Budget, *, workdir_root: epath.Path,
                data_dir: str | None, manual_dir: str | None
                ) -> ml_collections.ConfigDict:
  """The training config of one cell.

  Args:
    cell: the cell.
    budget: its budget.
    workdir_root: where the cells' workdirs are (for ``init_from``).
    data_dir: TFDS data dir (None: TFDS's default).
    manual_dir: Fashion-MNIST IDX files (None: the Debian package's).
  """
  config = base.get_config()
  config.seed = cell.seed
  config.data.dataset = 'fashion_mnist'
  config.data.data_dir = data_dir
  config.data.manual_dir = manual_dir
  config.data.train_split, config.data.eval_split = 'train', 'test'
  config.data.num_workers = 2 if budget.max_steps <= 0 else 0
  config.model.num_classes = 10
  config.model.width_multiplier = budget.width_multiplier
  config.model.fc6_kernel = 1  # 32 px crops leave a 1x1 map
  config.model.dropout_rate = 0.25  # a net this narrow underfits with 0.5
  config.input.crop_size = 32
  config.input.pca_sigma = 0.0  # grey images
  # Unit-scale inputs for Glorot; the paper's mean-only subtraction leaves
  # 0-255 values that make these plain nets diverge.
  config.input.normalization = 'imagenet_mean_std'
  base.apply_stage(config, cell.net, cell.stage)
  config.model.init = cell.init
  config.train.learning_rate = 1e-2  # every cell trains from scratch
  config.train.init_from = (str(workdir_root / cell.parent) if cell.parent
                            else '')
  _set_budget(config, budget)
  return config


def _set_budget(config: ml_collections.ConfigDict, budget: Budget) -> None:
  steps_per_epoch = 60_000 // budget.batch_size
  total = (budget.max_steps if budget.max_steps > 0
           else math.ceil(budget.num_epochs * steps_per_epoch))
  t = config.train
  t.batch_size, t.eval_batch_size = budget.batch_size, budget.eval_batch_size
  t.num_epochs, t.max_steps = budget.num_epochs, budget.max_steps
  t.schedule = 'step'
  t.step_boundaries_epochs = ((0.6 * budget.num_epochs,
                               0.85 * budget.num_epochs)
                              if budget.max_steps <= 0 else ())
  # One validation, at the end; checkpoints every ~half epoch for resuming.
  t.eval_every_steps = total
  t.checkpoint_every_steps = max(1, min(total, steps_per_epoch // 2))
  t.log_every_steps = max(1, min(100, total))
  config.data.eval_split = budget.validation_split


def _kept(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
  return {p: {k: r[k] for k in ('top1_error', 'top5_error', 'scales',
                                'num_examples')}
          for p, r in results.items()}


def evaluate_cell(cell: Cell, workdir: epath.Path, budget: Budget
                  ) -> dict[str, Any]:
  """The cell's tests: single scale on the test split, the rest on a subset."""
  member = evaluate.load_member(str(workdir))
  scales = base.stage_scales(cell.stage, 32)
  subset = f'test[:{budget.subset}]' if budget.subset else 'test'
  out = {'single': _kept(evaluate.evaluate(
      [member], protocols=('center_crop',), scales=(scales.test_scale,),
      split='test'))}
  if cell.scale_tests or cell.protocol_tests:
    out['subset_single'] = _kept(evaluate.evaluate(
        [member], protocols=('dense',), scales=(scales.test_scale,),
        split=subset))
    protocols = (('dense', 'multi_crop', 'multi_crop_dense')
                 if cell.protocol_tests else ('dense',))
    out['subset_multi'] = _kept(evaluate.evaluate(
        [member], protocols=protocols, scales=scales.multi_scales,
        split=subset))
  return out


def read_results(out_dir: epath.Path) -> dict[str, Any]:
  return paths.read_json(out_dir / RESULTS_JSON, default={})


def run_cell(cell: Cell, config: ml_collections.ConfigDict,
             workdir: epath.Path, budget: Budget) -> dict[str, Any] | None:
  """Trains (or resumes) one cell and tests it; its record (None: stopped)."""
  t0 = time.monotonic()
  summary = train.train_and_evaluate(config, str(workdir))
  if summary['stopped'] not in ('done', 'plateau'):
    return None  # preempted: the rerun resumes its checkpoint
  t1 = time.monotonic()
  tests = evaluate_cell(cell, workdir, budget)
  return {'cell': dataclasses.asdict(cell), 'steps': summary['step'],
          'train_seconds': t1 - t0, 'eval_seconds': time.monotonic() - t1,
          'scales': [config.input.scale_min, config.input.scale_max],
          'tests': tests}


def select(names: Sequence[str]) -> list[Cell]:
  """The cells named (all when empty); unknown names are a ValueError."""
  every = cells()
  if not names:
    return every
  known = {c.name for c in every}
  unknown = sorted(set(names) - known)
  if unknown:
    raise ValueError(f'Unknown cell(s) {", ".join(unknown)}; cells: '
                     f'{", ".join(c.name for c in every)}.')
  return [c for c in every if c.name in names]


def run_study(out_dir: str, workdir_root: str, *, budget: str = 'full',
              names: Sequence[str] = (), data_dir: str | None = None,
              manual_dir: str | None = None, dry_run: bool = False
              ) -> dict[str, Any]:
  """Runs the cells not yet in ``OUT/results.json``, then writes the report.

  Args:
    out_dir: where results.json, results.md and study.png go.
    workdir_root: where each cell trains (``ROOT/<cell>``).
    budget: a key of ``BUDGETS``.
    names: cells to run (all when empty); a cell's parent must be run or
      already recorded.
    data_dir: TFDS data dir.
    manual_dir: Fashion-MNIST IDX files.
    dry_run: print the cells and their state; run nothing.

  Returns:
    The results, keyed by cell name.
  """
  if budget not in BUDGETS:
    raise ValueError(f'Unknown budget {budget!r}; valid: '
                     f'{", ".join(BUDGETS)}.')
  out, root = paths.absolute(out_dir), paths.absolute(workdir_root)
  results = read_results(out)
  if results and {r['budget'] for r in results.values()} != {budget}:
    raise ValueError(f'{out / RESULTS_JSON} holds cells of another budget; '
                     'use another --out (and --workdir_root).')
  todo = select(names)
  for cell in todo:
    done = 'done' if cell.name in results else 'pending'
    print(f'{cell.name} [{done}] {cell.net} {cell.stage} seed {cell.seed} '
          f'init {cell.parent or cell.init}')
  if dry_run:
    return results
  for cell in todo:
    if cell.name in results:
      continue
    if cell.parent and cell.parent not in results:
      raise ValueError(f'{cell.name} initialises from {cell.parent}, which '
                       'has not run; run it first (or run all cells).')
    config = cell_config(cell, BUDGETS[budget], workdir_root=root,
                         data_dir=data_dir, manual_dir=manual_dir)
    logging.info('Study: cell %s', cell.name)
    record = run_cell(cell, config, root / cell.name, BUDGETS[budget])
    if record is None:
      print(f'{cell.name} was stopped; rerun the same command to continue.')
      return results
    results[cell.name] = {'budget': budget, **record}
    paths.write_json(out / RESULTS_JSON, results, indent=1, sort_keys=True)
  study_report.write_report(results, out, num_cells=len(cells()))
  return results


def define_flags(flag_values: flags.FlagValues) -> None:
  """The flags of ``python -m vgg_jax.study``.

  Args:
    flag_values: where to register them.
  """
  flags.DEFINE_enum('budget', 'full', list(BUDGETS),
                    'full: the study (~90 min on 2 cores); tiny: seconds '
                    'per cell, to try the command.', flag_values=flag_values)
  flags.DEFINE_string('out', 'docs/study', 'results.json, results.md and '
                      'study.png go here.', flag_values=flag_values)
  flags.DEFINE_string('workdir_root', 'workdirs/study',
                      'Each cell trains in WORKDIR_ROOT/<cell>.',
                      flag_values=flag_values)
  flags.DEFINE_string('cells', None, 'Comma-separated cells to run '
                      '(default: all).', flag_values=flag_values)
  flags.DEFINE_string('data_dir', None, 'TFDS data dir (default: TFDS\'s).',
                      flag_values=flag_values)
  flags.DEFINE_string('manual_dir', None, 'Fashion-MNIST IDX files '
                      '(default: /usr/share/datasets/fashion-mnist).',
                      flag_values=flag_values)
  flags.DEFINE_bool('dry_run', False, 'List the cells; run nothing.',
                    flag_values=flag_values)
  flags.DEFINE_bool('report_only', False, 'Rewrite results.md and study.png '
                    'from results.json; train nothing.',
                    flag_values=flag_values)


def main(flag_values: flags.FlagValues) -> int:
  """``python -m vgg_jax.study``; returns the exit code.

  Args:
    flag_values: parsed ``define_flags`` flags.
  """
  logging.set_verbosity(logging.INFO)
  if flag_values.report_only:
    out = paths.absolute(flag_values.out)
    study_report.write_report(read_results(out), out,
                              num_cells=len(cells()))
    return 0
  run_study(flag_values.out, flag_values.workdir_root,
            budget=flag_values.budget,
            names=cli.comma_list(flag_values.cells),
            data_dir=flag_values.data_dir,
            manual_dir=flag_values.manual_dir, dry_run=flag_values.dry_run)
  return 0


if __name__ == '__main__':
  cli.run(define_flags, main)
