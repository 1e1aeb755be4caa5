"""Evaluation results for people and files: console table, JSON, TensorBoard.

``evaluate.evaluate`` returns ``{protocol: result}``; this module names,
prints and writes those results (``WORKDIR/eval/<name>_step<step>.json`` and
TensorBoard scalars in ``WORKDIR/eval``).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np

METRICS = ('top1_error', 'top5_error', 'top1_accuracy', 'top5_accuracy')
# Per-example arrays that ``evaluate(..., return_posteriors=True)`` adds; they
# stay in memory and are not written.
PER_EXAMPLE = ('posteriors', 'labels', 'index')


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
  """A console table, one row per result (e.g. per protocol)."""
  header = (f'{"protocol":<17} {"scales":<16} {"top-1 err":>9} '
            f'{"top-5 err":>9} {"top-1 acc":>9} {"top-5 acc":>9} '
            f'{"examples":>9} {"time (s)":>9}')
  lines = [header, '-' * len(header)]
  for p, r in results.items():
    scales = ','.join(str(q) for q in np.ravel(r['scales']))
    lines.append(
        f'{p:<17} {scales:<16} {100 * r["top1_error"]:>8.2f}% '
        f'{100 * r["top5_error"]:>8.2f}% {100 * r["top1_accuracy"]:>8.2f}% '
        f'{100 * r["top5_accuracy"]:>8.2f}% {r["num_examples"]:>9d} '
        f'{r["wall_time_s"]:>9.1f}')
  return '\n'.join(lines)


def result_name(result: Mapping[str, Any]) -> str:
  """File stem / TensorBoard prefix, e.g. ``dense_q256-384-512_validation``."""
  scales = '-'.join(str(q) for q in np.ravel(result['scales']))
  name = f'{result["protocol"]}_q{scales}_{result["split"]}'
  if len(result['members']) > 1:
    name += f'_ensemble{len(result["members"])}'
  return name


def write_results(results: Mapping[str, Mapping[str, Any]], eval_dir: str, *,
                  step: int | None = None, tag: str = '') -> list[str]:
  """Writes one JSON per protocol and TensorBoard scalars (process 0 only).

  Args:
    results: ``evaluate``'s output (posteriors, if any, are not written).
    eval_dir: output folder (``WORKDIR/eval``).
    step: TensorBoard step (the checkpoint step); None: 0.
    tag: extra file-name part (e.g. ``'step1000'``).

  Returns:
    The JSON paths written (empty on other processes).
  """
  if jax.process_index() != 0:
    return []
  os.makedirs(eval_dir, exist_ok=True)
  written, scalars = [], {}
  for r in results.values():
    r = {k: v for k, v in r.items() if k not in PER_EXAMPLE}
    name = result_name(r)
    path = os.path.join(eval_dir, f'{name}{"_" + tag if tag else ""}.json')
    with open(path, 'w') as f:
      json.dump(r, f, indent=2, sort_keys=True)
    written.append(path)
    scalars.update({f'{name}/{metric}': r[metric] for metric in METRICS})
  _write_scalars(eval_dir, int(step or 0), scalars)
  return written


def _write_scalars(log_dir: str, step: int, scalars: Mapping[str, float]):
  # Imported here: clu's writers import TensorFlow, which callers that only
  # format results (notebooks, predict) need not load.
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  writer = metric_writers.create_default_writer(log_dir, asynchronous=False)
  writer.write_scalars(step, scalars)
  writer.flush()
  writer.close()
