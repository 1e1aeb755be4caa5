"""The small-scale study's report: a table and a verdict per claim, a plot.

``vgg_jax.study`` records each cell's test errors; this module groups them by
the paper's claims (``CLAIMS``), decides per claim whether the small-scale
numbers reproduce it, and writes ``results.md`` and ``study.png``.

A verdict compares row means: a difference counts when it exceeds two
standard errors, from the test set's sampling (binomial) and the spread over
seeds (rows with one seed take the spread pooled over two-seed rows). A
claim is "reproduced at this scale" when every check goes the paper's way,
"not reproduced" when one goes significantly the other way, and "not
distinguishable" otherwise.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any, Sequence

from etils import epath

from vgg_jax import paths


@dataclasses.dataclass(frozen=True)
class Row:
  """One bar of a comparison: a cell family's top-1 error in one test.

  Attributes:
    label: as shown.
    prefix: the cells ``PREFIX_s<seed>``.
    test: ``single``, ``subset_single`` or ``subset_multi``.
    protocol: the protocol read.
    paper: the paper's top-1 error (or words) for the analogous row.
  """
  label: str
  prefix: str
  test: str = 'single'
  protocol: str = 'center_crop'
  paper: str = 'n/a'


@dataclasses.dataclass(frozen=True)
class Claim:
  """A claim of the paper and the row pairs that test it.

  ``checks`` are ``(a, b, relation)`` over row indices: ``'<'`` means b's
  error is lower than a's, ``'~'`` on par, ``'!<'`` b not lower than a.
  """
  title: str
  claim: str
  rows: tuple[Row, ...]
  checks: tuple[tuple[int, int, str], ...]


_SUB = dict(test='subset_single', protocol='dense')
_MULTI = dict(test='subset_multi', protocol='dense')
CLAIMS = (
    Claim('A vs A-LRN', 'LRN does not improve net A (Sec. 4.1).',
          (Row('A', 'A', paper='29.6'), Row('A-LRN', 'A_LRN', paper='29.7')),
          ((0, 1, '!<'),)),
    Claim('Depth: A, B, D, E', 'Error falls from A to B to D; E is on par '
          'with D (Sec. 4.1).',
          (Row('A', 'A', paper='29.6'), Row('B', 'B', paper='28.7'),
           Row('D', 'D', paper='27.0'), Row('E', 'E', paper='27.3')),
          ((0, 1, '<'), (1, 2, '<'), (2, 3, '~'))),
    Claim('C (1x1) vs D (3x3)', 'At the same depth 3x3 convs beat 1x1 ones '
          '(Sec. 4.1).', (Row('C', 'C', paper='28.1'),
                          Row('D', 'D', paper='27.0')), ((0, 1, '<'),)),
    Claim('B vs shallow 5x5', 'Net B beats the shallow net of 5x5 convs by 7 '
          'points top-1 on a centre crop (Sec. 4.1).',
          (Row('B-5x5', 'B_5x5', paper='B + 7'), Row('B', 'B', paper='B')),
          ((0, 1, '<'),)),
    Claim('Training scale', 'Jittered S beats fixed S, even at one test '
          'scale (Sec. 4.1; here all three from scratch).',
          (Row('S=37', 'D', paper='27.0'), Row('S=55', 'D_S55', paper='26.8'),
           Row('S in [37, 73]', 'D_jitter', paper='25.6')),
          ((0, 2, '<'), (1, 2, '<'))),
    Claim('Multi-scale test', 'Averaging over test scales beats one scale '
          '(Sec. 4.2, dense).',
          (Row('S=37, Q=37', 'D', paper='27.0', **_SUB),
           Row('S=37, Q={32,37,42}', 'D', paper='26.6', **_MULTI),
           Row('jitter, Q=55', 'D_jitter', paper='25.6', **_SUB),
           Row('jitter, Q={37,55,73}', 'D_jitter', paper='24.8', **_MULTI)),
          ((0, 1, '<'), (2, 3, '<'))),
    Claim('Dense vs multi-crop', 'Multi-crop and dense complement each other: '
          'both together are best (Sec. 4.3).',
          (Row('dense', 'D_jitter', paper='24.8', **_MULTI),
           Row('multi-crop', 'D_jitter', test='subset_multi',
               protocol='multi_crop', paper='24.6'),
           Row('both', 'D_jitter', test='subset_multi',
               protocol='multi_crop_dense', paper='24.4')),
          ((0, 2, '<'), (1, 2, '<'))),
    Claim('Init: net A vs Glorot', 'Glorot initialisation trains a deep net '
          'as well as net A\'s layers do (footnote, Sec. 3.1); He, this '
          'study\'s default, for reference.',
          (Row('D from A', 'D_from_A', paper='27.0'),
           Row('D Glorot', 'D_glorot'), Row('D He', 'D')), ((0, 1, '~'),)),
)


def row_values(results: dict[str, Any], row: Row) -> tuple[list[float], int]:
  """Top-1 errors (%) of the row's cells and the test images each counts."""
  values, n = [], 0
  for name, record in sorted(results.items()):
    if name.rsplit('_s', 1)[0] == row.prefix:
      r = record['tests'].get(row.test, {}).get(row.protocol)
      if r:
        values.append(100 * r['top1_error'])
        n = r['num_examples']
  return values, n


def _noise(values: Sequence[float], n: int, seed_std: float) -> float:
  """Standard error of a row's mean: test-set sampling and seed spread."""
  p = statistics.mean(values) / 100
  std = statistics.stdev(values) if len(values) > 1 else seed_std
  return math.sqrt(100 ** 2 * p * (1 - p) / max(n, 1) + std ** 2
                   / len(values))


def pooled_seed_std(results: dict[str, Any]) -> float:
  """Seed spread pooled over every two-seed row (for one-seed rows)."""
  spreads = []
  for claim in CLAIMS:
    for row in claim.rows:
      values, _ = row_values(results, row)
      if len(values) > 1:
        spreads.append(statistics.variance(values))
  return math.sqrt(statistics.mean(spreads)) if spreads else 0.0


def verdict(a: tuple[list[float], int], b: tuple[list[float], int],
            relation: str, seed_std: float) -> tuple[str, float, float]:
  """``(verdict, b - a in points, its two-sigma band)`` for one check."""
  diff = statistics.mean(b[0]) - statistics.mean(a[0])
  band = 2 * math.hypot(_noise(*a, seed_std), _noise(*b, seed_std))
  if abs(diff) <= band:
    outcome = 'reproduced' if relation in ('~', '!<') else 'not distinguishable'
  elif relation == '<':
    outcome = 'reproduced' if diff < 0 else 'not reproduced'
  elif relation == '!<':
    outcome = 'reproduced' if diff > 0 else 'not reproduced'
  else:
    outcome = 'not reproduced'
  return outcome, diff, band


def _overall(outcomes: Sequence[str]) -> str:
  if 'not reproduced' in outcomes:
    return 'not reproduced at this scale'
  if 'not distinguishable' in outcomes:
    return 'not distinguishable at this scale'
  return 'reproduced at this scale'


def claim_markdown(claim: Claim, results: dict[str, Any],
                   seed_std: float) -> list[str]:
  """A claim's table and verdict (empty while its cells have not run)."""
  data = [row_values(results, row) for row in claim.rows]
  if not all(values for values, _ in data):
    return []
  lines = [f'### {claim.title}', '', f'Paper: {claim.claim}', '',
           '| variant | test | top-1 err % (mean) | seeds | paper top-1 % |',
           '|---|---|---:|---|---:|']
  for row, (values, n) in zip(claim.rows, data):
    seeds = ', '.join(f'{v:.2f}' for v in values)
    lines.append(f'| {row.label} | {row.protocol}, {n} images | '
                 f'{statistics.mean(values):.2f} | {seeds} | {row.paper} |')
  lines.append('')
  outcomes = []
  for a, b, relation in claim.checks:
    outcome, diff, band = verdict(data[a], data[b], relation, seed_std)
    outcomes.append(outcome)
    lines.append(f'- {claim.rows[b].label} vs {claim.rows[a].label}: '
                 f'{diff:+.2f} points (noise band +-{band:.2f}): {outcome}.')
  lines += ['', f'**Verdict: {_overall(outcomes)}.**', '']
  return lines


def summary_markdown(results: dict[str, Any], seed_std: float) -> list[str]:
  """One line per claim: each variant's mean top-1 error, paper's, verdict."""
  lines = ['| claim (paper) | this study: top-1 error % (paper\'s) | verdict |',
           '|---|---|---|']
  for claim in CLAIMS:
    data = [row_values(results, row) for row in claim.rows]
    if not all(values for values, _ in data):
      continue
    cells = '; '.join(f'{row.label} {statistics.mean(values):.1f} '
                      f'({row.paper})'
                      for row, (values, _) in zip(claim.rows, data))
    outcomes = [verdict(data[a], data[b], relation, seed_std)[0]
                for a, b, relation in claim.checks]
    lines.append(f'| {claim.title}: {claim.claim} | {cells} | '
                 f'{_overall(outcomes)} |')
  return lines + ['']


def write_plot(results: dict[str, Any], path: epath.Path) -> None:
  """One panel per claim: mean top-1 error per variant, seeds as dots."""
  # matplotlib is an optional dependency (the `test` extra): only the plot
  # needs it, so running cells and writing the tables work without it.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')  # files only, no display
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  fig, axes = pyplot.subplots(2, 4, figsize=(16, 7))
  for ax, claim in zip(axes.flat, CLAIMS):
    data = [row_values(results, row)[0] for row in claim.rows]
    for i, values in enumerate(data):
      if values:
        ax.bar(i, statistics.mean(values), color='tab:blue', alpha=0.6)
        ax.plot([i] * len(values), values, 'k.')
    ax.set_xticks(range(len(claim.rows)),
                  [f'{r.label}\n(paper {r.paper})' for r in claim.rows],
                  rotation=20, fontsize=8)
    ax.set_title(claim.title, fontsize=10)
    ax.set_ylabel('top-1 error %')
    present = [v for values in data for v in values]
    if present:
      ax.set_ylim(max(0, min(present) - 2), max(present) + 1)
  fig.tight_layout()
  with paths.replaced_atomically(path, overwrite=True) as tmp:
    with tmp.open('wb') as f:
      fig.savefig(f, format='png', dpi=80)
  pyplot.close(fig)


def write_report(results: dict[str, Any], out_dir: epath.Path, *,
                 num_cells: int) -> None:
  """``results.md`` and ``study.png`` from the recorded cells.

  Args:
    results: ``vgg_jax.study``'s records, keyed by cell name.
    out_dir: where the two files go.
    num_cells: cells in the whole study (to say how many have run).
  """
  seed_std = pooled_seed_std(results)
  train_s = sum(r['train_seconds'] for r in results.values())
  eval_s = sum(r['eval_seconds'] for r in results.values())
  lines = ['# The paper\'s claims at small scale (Fashion-MNIST)', '',
           f'{len(results)} of {num_cells} cells; {train_s / 60:.1f} min '
           f'training, {eval_s / 60:.1f} min testing. Errors in %, the '
           'paper\'s on ILSVRC-2012. A difference counts when it exceeds two '
           'standard errors (test sampling and seed spread; one-seed rows '
           f'take the pooled seed spread, {seed_std:.2f} points).', '',
           '![study](study.png)', '']
  lines += summary_markdown(results, seed_std)
  for claim in CLAIMS:
    lines += claim_markdown(claim, results, seed_std)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / 'results.md').write_text('\n'.join(lines))
  write_plot(results, out_dir / 'study.png')
