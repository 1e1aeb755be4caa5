r"""Evaluates a network or an ensemble with the paper's test protocols.

The protocols themselves (``center_crop``, ``dense``, ``multi_crop``,
``multi_crop_dense``; Sec. 3.2 and 4) are kernels in ``vgg_jax.protocols``;
``vgg_jax.eval_plan`` works out what one pass over a dataset split computes
for every requested protocol, scale and ensemble member. This module runs
that pass batch by batch on all devices and turns the counts into results
(``vgg_jax.reporting`` prints and writes them). Posteriors are averaged over
scales Q, over the two protocols of ``multi_crop_dense`` and over the members
of an ensemble.

Command line (the run's config is read from its workdir)::

    python -m vgg_jax.evaluate --workdir=DIR --protocol=dense \
      --scales=256,384,512
    python -m vgg_jax.evaluate --workdir=DIR --multi_scale \
      --protocol=dense,multi_crop,multi_crop_dense --ensemble=DIR2 \
      --config.data.manual_dir=/data/imagenet

Results go to the console, ``DIR/eval/*.json`` and TensorBoard (``DIR/eval``).
From a notebook: ``evaluate.evaluate_model(model, config, protocol='dense',
scales=(256, 384, 512))['top1_error']``.
"""

from __future__ import annotations

from vgg_jax import host_memory

if __name__ == '__main__':  # first: glibc reads its tunables at start-up
  host_memory.reexec_with_huge_pages()

# pylint: disable=g-import-not-at-top,wrong-import-position
import collections
import dataclasses
import functools
import os
import time
from typing import Any, Mapping, Sequence

from absl import flags
from absl import logging
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
import ml_collections
import numpy as np
from flax import nnx

from vgg_jax import cli
from vgg_jax import eval_plan
from vgg_jax import metrics
from vgg_jax import protocols as protocols_lib
from vgg_jax import reporting
from vgg_jax import sharding as sharding_lib

PROGRESS_EVERY_S = 60.0  # seconds between progress log lines

# The documented entry points: evaluate.Member(model, config), load_member(dir).
Member = eval_plan.Member
load_member = eval_plan.load_member


# ----------------------------------------------------------------------------
# The batch loop and its results.


@dataclasses.dataclass(frozen=True)
class _Settings:
  """One pass's protocols, data, batch and mesh, checked."""
  protocols: tuple[str, ...]
  data_config: ml_collections.ConfigDict
  split: str
  batch_size: int
  mesh: Mesh
  num_classes: int


def _seconds() -> collections.defaultdict:
  return collections.defaultdict(float)


@dataclasses.dataclass
class _Tally:
  """What the batch loop accumulates: hit counts, timings, kept posteriors.

  ``counts`` holds ``(top-1 hits, top-5 hits, examples)`` per protocol; the
  timings are seconds per stream key, source key and protocol.
  """
  counts: dict[str, np.ndarray]
  keep_posteriors: bool
  stream_time: dict = dataclasses.field(default_factory=_seconds)
  source_time: dict = dataclasses.field(default_factory=_seconds)
  score_time: dict = dataclasses.field(default_factory=_seconds)
  kept: dict = dataclasses.field(
      default_factory=lambda: collections.defaultdict(list))
  num_batches: int = 0
  total_time: float = 0.0


def _settings(members: Sequence[eval_plan.Member],
              protocols: str | Sequence[str], split: str | None,
              batch_size: int | None,
              data_config: ml_collections.ConfigDict | None) -> _Settings:
  """Resolves ``evaluate``'s defaults and refuses what cannot run."""
  if not members:
    raise ValueError('evaluate() needs at least one member.')
  protocols = protocols_lib.parse_protocols(protocols)
  data_config = data_config or members[0].config
  batch_size = int(data_config.train.eval_batch_size if batch_size is None
                   else batch_size)
  if batch_size < 1:
    raise ValueError(f'Eval batch size must be positive, got {batch_size}.')
  num_classes = sorted({int(m.model.num_classes) for m in members})
  if len(num_classes) > 1:
    raise ValueError(f'Ensemble members disagree on num_classes: '
                     f'{num_classes}.')
  mesh = sharding_lib.create_mesh()
  if batch_size % mesh.size:
    raise ValueError(f'Eval batch size {batch_size} is not divisible by the '
                     f'{mesh.size} devices; pass a multiple (e.g. '
                     f'{mesh.size * max(1, batch_size // mesh.size)}).')
  return _Settings(protocols, data_config,
                   split or data_config.data.eval_split, batch_size, mesh,
                   num_classes[0])


@functools.partial(jax.jit, static_argnums=1)
def _average(posteriors, coefficients):
  return sum(c * p for c, p in zip(coefficients, posteriors))


@functools.partial(jax.jit, static_argnums=1)
def _score(posteriors, coefficients, labels, mask):
  return metrics.topk_hits(_average(posteriors, coefficients), labels, mask,
                           metrics.TOP_K)


def _gather(x: jax.Array, mask: jax.Array) -> np.ndarray:
  """A global batch on the host of every process, padding rows dropped."""
  if jax.process_count() > 1:
    x, mask = multihost_utils.process_allgather((x, mask), tiled=True)
  x, mask = np.asarray(x), np.asarray(mask)
  return x[mask]


def _source_posteriors(plan: eval_plan.Plan,
                       batches: Mapping[eval_plan.StreamKey, Any], mesh: Mesh,
                       tally: _Tally) -> dict[eval_plan.SourceKey, jax.Array]:
  """Every (member, source, scale) posterior of one batch, each once."""
  inputs = {k: eval_plan.device_inputs(b, mesh) for k, b in batches.items()}
  posteriors = {}
  for key, stream in plan.source_stream.items():
    i, s, _ = key
    t = time.perf_counter()
    posteriors[key] = jax.block_until_ready(
        plan.programs[i][s](plan.weights[i], *inputs[stream]))
    tally.source_time[key] += time.perf_counter() - t
  return posteriors


def _batch_step(plan: eval_plan.Plan,
                batches: Mapping[eval_plan.StreamKey, Any], mesh: Mesh,
                tally: _Tally) -> None:
  """Computes the sources of one batch, then scores every protocol."""
  first = next(iter(batches.values()))
  targets = {'label': np.asarray(first['label'], np.int32),
             'mask': np.asarray(first['mask'], bool)}
  if tally.keep_posteriors and 'index' in first:
    targets['index'] = np.asarray(first['index'], np.int32)
  targets = sharding_lib.global_batch(targets, mesh)
  mask = targets['mask']
  posteriors = _source_posteriors(plan, batches, mesh, tally)
  for p, terms in plan.terms.items():
    t = time.perf_counter()
    scores = [posteriors[k] for k, _ in terms]
    coefficients = tuple(c for _, c in terms)
    tally.counts[p] += np.asarray(jax.device_get(
        _score(scores, coefficients, targets['label'], mask)), np.int64)
    if tally.keep_posteriors:
      tally.kept[p].append(_gather(_average(scores, coefficients), mask))
    tally.score_time[p] += time.perf_counter() - t
  if tally.keep_posteriors:
    tally.kept['labels'].append(_gather(targets['label'], mask))
    if 'index' in targets:
      tally.kept['index'].append(_gather(targets['index'], mask))
  tally.num_batches += 1


def _run_batches(plan: eval_plan.Plan,
                 streams: Mapping[eval_plan.StreamKey, Any],
                 settings: _Settings, keep_posteriors: bool) -> _Tally:
  """The pass over the split, with a progress line every minute."""
  tally = _Tally({p: np.zeros(3, np.int64) for p in settings.protocols},
                 keep_posteriors)
  start = last_log = time.perf_counter()
  while (batches := eval_plan.next_batches(streams, tally.stream_time)):
    _batch_step(plan, batches, settings.mesh, tally)
    if time.perf_counter() - last_log > PROGRESS_EVERY_S:
      last_log = time.perf_counter()
      seen = int(tally.counts[settings.protocols[0]][2])
      logging.info('Evaluated %d batches, %d examples (%.1f examples/s)',
                   tally.num_batches, seen, seen / (last_log - start))
  tally.total_time = time.perf_counter() - start
  for prog in plan.all_programs():
    logging.info('%s: compiled %d program(s), for inputs %s', prog.source,
                 len(prog.traces), prog.traces)
  return tally


def _ordered_posteriors(kept: Mapping[str, list], protocol: str
                        ) -> dict[str, np.ndarray]:
  """Gathered posteriors and labels, sorted by split index when known."""
  out = {'posteriors': np.concatenate(kept[protocol], 0),
         'labels': np.concatenate(kept['labels'], 0)}
  if kept.get('index'):
    index = np.concatenate(kept['index'], 0)
    order = np.argsort(index, kind='stable')
    out = {k: v[order] for k, v in out.items()}
    out['index'] = index[order]
  return out


def _result(protocol: str, settings: _Settings, plan: eval_plan.Plan,
            tally: _Tally) -> dict[str, Any]:
  """One protocol's result dict (see ``evaluate``)."""
  top1, top5, n = (int(v) for v in tally.counts[protocol])
  dataset = settings.data_config.data.dataset
  if n == 0:
    raise ValueError(f'Split {settings.split!r} of {dataset} gave no '
                     'examples to evaluate.')
  terms, used = plan.terms[protocol], plan.used_programs(protocol)
  same_scales = len(set(plan.scales)) == 1
  result = {
      'protocol': protocol,
      'split': settings.split,
      'dataset': dataset,
      'scales': (list(plan.scales[0]) if same_scales
                 else [list(q) for q in plan.scales]),
      'members': [m.name for m in plan.members],
      'steps': [m.step for m in plan.members],
      'num_examples': n,
      'top1_accuracy': top1 / n,
      'top5_accuracy': top5 / n,
      'top1_error': 1.0 - top1 / n,
      'top5_error': 1.0 - top5 / n,
      'top_k': min(metrics.TOP_K, settings.num_classes),
      # A source or stream shared by two protocols counts for both.
      'wall_time_s': (
          tally.score_time[protocol]
          + sum(tally.source_time[k] for k, _ in terms)
          + sum(tally.stream_time[k] for k in plan.protocol_streams(protocol))),
      'total_wall_time_s': tally.total_time,
      'num_batches': tally.num_batches,
      'global_batch_size': settings.batch_size,
      'num_devices': settings.mesh.size,
      'num_processes': jax.process_count(),
      # With members of different scale counts, the first member's.
      'passes_per_image': protocols_lib.passes_per_image(
          protocol, len(plan.scales[0]), plan.grid),
      'programs_compiled': sum(len(prog.traces) for prog in used),
      'program_input_shapes': {
          s: [list(t) for prog in used if prog.source == s
              for t in prog.traces]
          for s in protocols_lib.PROTOCOL_SOURCES[protocol]},
  }
  if tally.keep_posteriors:
    result.update(_ordered_posteriors(tally.kept, protocol))
  return result


def evaluate(members: Sequence[eval_plan.Member], *,
             protocols: str | Sequence[str] = ('dense',),
             scales: Sequence[int] | None = None,
             multi_scale: bool = False,
             split: str | None = None,
             batch_size: int | None = None,
             data_config: ml_collections.ConfigDict | None = None,
             iterator_fn: eval_plan.IteratorFn | None = None,
             grid: int = protocols_lib.MULTI_CROP_GRID,
             return_posteriors: bool = False) -> dict[str, dict[str, Any]]:
  """Evaluates one network or an ensemble with one or more protocols.

  One pass over the split serves every protocol: each batch is read once per
  (input mode, scale) and each (member, source, scale) posterior is computed
  once, then averaged per protocol (over scales, over the sources of
  ``multi_crop_dense`` and over members, in that order). Batches are sharded
  over all devices of all processes on a 1-D ``'data'`` mesh; weights are
  replicated. A program is compiled once per (architecture and
  preprocessing, source, input shape): with the input pipeline's fixed
  canvas per scale, once per scale.

  Args:
    members: the networks; one for a single model, several for an ensemble.
    protocols: names from ``protocols.PROTOCOLS`` (a list or ``'a,b'``).
    scales: test scales Q for every member; None: each member's own
      ``scales`` or ``protocols.default_scales(config, multi_scale=...)``.
    multi_scale: with ``scales=None``, use the paper's multi-scale set.
    split: dataset split; None: ``data_config.data.eval_split``.
    batch_size: global batch; None: ``data_config.train.eval_batch_size``.
      Must divide by the number of devices.
    data_config: config whose ``data`` and ``input`` sections read the
      dataset; None: the first member's.
    iterator_fn: ``fn(config, *, split, scale, mode, global_batch_size)``
      yielding batches as ``input_pipeline.create_eval_iterator`` does
      (the default).
    grid: multi-crop grid side (the paper: 5).
    return_posteriors: also return each protocol's per-example posteriors
      (``'posteriors'``, ``(examples, classes)``), ``'labels'`` and, when the
      batches carry it, the split ``'index'`` of each row, gathered from all
      processes and sorted by that index; only for small splits.

  Returns:
    ``{protocol: result}`` with ``top1_error``, ``top5_error``,
    ``top1_accuracy``, ``top5_accuracy`` (fractions), ``num_examples``,
    ``wall_time_s`` (reading the protocol's batches and running its programs;
    a source shared by two protocols counts for both), ``total_wall_time_s``
    (the whole pass), ``scales``, ``programs_compiled`` and descriptive
    fields.
  """
  settings = _settings(members, protocols, split, batch_size, data_config)
  plan = eval_plan.make_plan(members, settings.protocols, scales,
                             multi_scale, grid, settings.mesh)
  streams = eval_plan.open_streams(plan.stream_keys(), settings.data_config,
                                   split=settings.split,
                                   batch_size=settings.batch_size,
                                   iterator_fn=iterator_fn)
  logging.info('Evaluating %s on %s (%s) with %d member(s), scales %s, '
               'global batch %d over %d device(s)',
               ','.join(settings.protocols),
               settings.data_config.data.dataset, settings.split,
               len(members), plan.scales, settings.batch_size,
               settings.mesh.size)
  tally = _run_batches(plan, streams, settings, return_posteriors)
  return {p: _result(p, settings, plan, tally) for p in settings.protocols}


def evaluate_model(model: nnx.Module, config: ml_collections.ConfigDict, *,
                   protocol: str = 'dense',
                   scales: Sequence[int] | None = None,
                   split: str | None = None, multi_scale: bool = False,
                   normalization: str | None = None,
                   mean_rgb: Sequence[float] | None = None,
                   batch_size: int | None = None,
                   iterator_fn: eval_plan.IteratorFn | None = None,
                   return_posteriors: bool = False) -> dict[str, Any]:
  """Evaluates one model on a dataset split with one protocol (notebooks).

  Args:
    model: a VGG (its mode is left unchanged; evaluation uses eval mode).
    config: its run config (dataset, crop size, scales, normalisation).
    protocol: one of ``protocols.PROTOCOLS``.
    scales: test scales Q; None: the paper's default for the run's S.
    split: dataset split; None: ``config.data.eval_split``.
    multi_scale: with ``scales=None``, the multi-scale default set.
    normalization: input normalisation the weights expect; None: the config's.
    mean_rgb: its mean; None: the config's.
    batch_size: global batch; None: ``config.train.eval_batch_size``.
    iterator_fn: custom batch source (see ``evaluate``).
    return_posteriors: also return per-example posteriors and labels.

  Returns:
    The result dict (``top1_error``, ``top5_error``, ``num_examples``, ...).
  """
  member = eval_plan.Member(model, config, normalization=normalization,
                  mean_rgb=mean_rgb)
  return evaluate([member], protocols=(protocol,), scales=scales,
                  multi_scale=multi_scale, split=split, batch_size=batch_size,
                  iterator_fn=iterator_fn,
                  return_posteriors=return_posteriors)[protocol]


# ----------------------------------------------------------------------------
# The command line.


def define_flags(flag_values: flags.FlagValues) -> None:
  """The flags of ``python -m vgg_jax.evaluate``.

  Args:
    flag_values: where to register them.
  """
  flags.DEFINE_string(
      'workdir', None, 'Training workdir (or pretrained dir); results go to '
      'WORKDIR/eval.', required=True, flag_values=flag_values)
  flags.DEFINE_string('checkpoint', 'latest', 'latest, best or a step number.',
                      flag_values=flag_values)
  flags.DEFINE_string(
      'protocol', 'dense', 'Protocol(s), comma-separated: '
      f'{", ".join(protocols_lib.PROTOCOLS)}. Several protocols share one '
      'pass over the data.', flag_values=flag_values)
  flags.DEFINE_string(
      'scales', None, 'Test scales Q, e.g. 256,384,512. Default: Q=S for '
      'fixed S, (S_min+S_max)/2 for jittered S; with --multi_scale '
      '{S-32,S,S+32} or {S_min,mid,S_max}.', flag_values=flag_values)
  flags.DEFINE_bool('multi_scale', False,
                    'Use the paper\'s multi-scale default scales.',
                    flag_values=flag_values)
  flags.DEFINE_string(
      'ensemble', None, 'More workdirs, comma-separated, whose posteriors are '
      'averaged with --workdir\'s (the paper\'s Table 6).',
      flag_values=flag_values)
  flags.DEFINE_string('split', None,
                      'Dataset split; default config.data.eval_split.',
                      flag_values=flag_values)
  flags.DEFINE_integer(
      'batch_size', None,
      'Global eval batch; default config.train.eval_batch_size.',
      flag_values=flag_values)
  cli.define_config_overrides(flag_values)


def members_from_flags(flag_values: flags.FlagValues
                       ) -> list[eval_plan.Member]:
  """``--workdir`` and ``--ensemble`` loaded, with ``--config.*`` applied.

  Args:
    flag_values: parsed ``define_flags`` flags.
  """
  overrides = functools.partial(cli.apply_config_overrides,
                                flag_values=flag_values)
  paths = [flag_values.workdir, *cli.comma_list(flag_values.ensemble)]
  return [eval_plan.load_member(p, checkpoint=flag_values.checkpoint,
                                config_overrides=overrides) for p in paths]


def main(flag_values: flags.FlagValues) -> int:
  """``python -m vgg_jax.evaluate --workdir=DIR ...``; returns the exit code.

  Args:
    flag_values: parsed ``define_flags`` flags.
  """
  logging.set_verbosity(logging.INFO)
  names = protocols_lib.parse_protocols(flag_values.protocol)
  scales = protocols_lib.parse_scales(flag_values.scales)
  members = members_from_flags(flag_values)
  results = evaluate(members, protocols=names, scales=scales,
                     multi_scale=flag_values.multi_scale,
                     split=flag_values.split,
                     batch_size=flag_values.batch_size)
  step = members[0].step
  written = reporting.write_results(
      results, os.path.join(flag_values.workdir, 'eval'), step=step,
      tag=f'step{step}' if step is not None else '')
  if jax.process_index() == 0:
    print(f'Members: {", ".join(m.name for m in members)} (checkpoint '
          f'{flag_values.checkpoint}, step {step})')
    print(reporting.format_table(results))
    for path in written:
      print(f'Wrote {path}')
  return 0


if __name__ == '__main__':
  cli.run(define_flags, main)
