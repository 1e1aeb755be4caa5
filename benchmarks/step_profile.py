"""Where a training step's time goes: XLA's ops, summed from a profile.

Traces a few steps of the project's jitted train step (the one
``train_step.py`` times, same options) with ``jax.profiler``, sums the time
of XLA's op events (on CPU, one per thunk: a convolution or GEMM fusion, a
loop fusion, a copy, ...) by op kind and by op, and prints the top ops with
their result and operand shapes taken from the compiled HLO. Events on
different threads overlap, so the sums can exceed the step's wall time.
BENCHMARKS.md ("Where the CPU time went", "Huge pages") was found this way.

    python benchmarks/step_profile.py --config=configs/quickstart.py
    python benchmarks/step_profile.py --models=vgg16 --steps=2 --top=30
"""

from __future__ import annotations

import collections
import functools
import pathlib
import re
import sys
import tempfile
from typing import Sequence

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# pylint: disable=g-import-not-at-top,wrong-import-position
from vgg_jax import host_memory

if __name__ == '__main__':  # before JAX, as vgg_jax's programs do
  host_memory.reexec_with_huge_pages()

import jax
from benchmarks import machine
from benchmarks import train_step
from vgg_jax import sharding
from vgg_jax import steps
# pylint: enable=g-import-not-at-top,wrong-import-position

# XLA op names end in a number (fusion.12, copy.3); the kind drops it.
_NUMBERED = re.compile(r'[._]\d+$')


def op_times(trace_dir: str) -> collections.Counter:
  """Nanoseconds per XLA op name in the profile under ``trace_dir``.

  Args:
    trace_dir: what ``jax.profiler.trace`` wrote (one ``*.xplane.pb``).
  """
  files = sorted(pathlib.Path(trace_dir).rglob('*.xplane.pb'))
  if not files:
    raise FileNotFoundError(f'{trace_dir}: the profiler wrote no xplane.pb.')
  data = jax.profiler.ProfileData.from_file(str(files[-1]))
  totals = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      # XLA:CPU's op events are on its executor threads (tf_XLA...);
      # "...Thunk" events wrap them and would count each op twice.
      if not line.name.startswith('tf_XLA'):
        continue
      for event in line.events:
        if 'Thunk' not in event.name:
          totals[event.name] += event.duration_ns
  return totals


def op_kinds(times: collections.Counter) -> collections.Counter:
  """``op_times`` summed by kind (``ynn_fusion.3`` -> ``ynn_fusion``)."""
  kinds = collections.Counter()
  for name, ns in times.items():
    kinds[_NUMBERED.sub('', name)] += ns
  return kinds


def op_shapes(hlo_text: str, name: str) -> str:
  """``result <- operand, operand`` shapes of op ``name`` in an HLO text."""
  shapes, operands = _definitions(hlo_text)
  if name not in operands:
    return ''
  return f'{shapes[name]} <- ' + ', '.join(
      shapes.get(o, o) for o in operands[name][:3])


@functools.lru_cache(maxsize=1)
def _definitions(hlo_text: str) -> tuple[dict[str, str], dict[str, list]]:
  """Every op's result shape, and the operands of single-result ops.

  Parsed once per HLO text: the table lists a few dozen ops of it.
  """
  shapes = dict(re.findall(r'%([\w.\-]+) = (\S+) ', hlo_text))
  operands = {
      name: [o.strip().lstrip('%') for o in args.split(',') if o.strip()]
      for name, args in re.findall(
          r'%([\w.\-]+) = \S+ [\w\-]+\(([^)]*)\)', hlo_text)}
  return shapes, operands


def _parser():
  p = train_step.make_parser()
  p.description = __doc__.split('\n\n')[0]
  p.add_argument('--top', type=int, default=25, help='ops to list')
  return p


def main(argv: Sequence[str]) -> None:
  args = train_step.parse_args(['--peers=none', *argv], _parser())
  print(f'# host CPU: {machine.describe()}; {host_memory.describe()}')
  for name in args.models:
    config = train_step.run_config(name, args)
    mesh = sharding.create_mesh()
    setup, state = steps.create_train_state(config, mesh)
    runner, _ = train_step.compiled_step(setup, state, config, mesh, name,
                                         args.image_size, args.seed)
    step_s = train_step.time_steps(runner, args.warmup, args.steps)
    with tempfile.TemporaryDirectory() as trace_dir:
      with jax.profiler.trace(trace_dir):
        train_step.time_steps(runner, 0, args.steps)
      times = op_times(trace_dir)
    hlo = runner.compiled.as_text()
    per_step = 1e6 * args.steps  # ns summed over the steps -> ms per step
    print(f'\n## {name}, batch {args.batch_size}, {args.image_size} px, '
          f'{args.dtype}: {1e3 * min(step_s):.1f} ms per step (fastest of '
          f'{args.steps}); XLA op time summed per step: '
          f'{sum(times.values()) / per_step:.1f} ms')
    print('\n| op kind | ms per step |\n|---|---:|')
    for kind, ns in op_kinds(times).most_common(15):
      print(f'| {kind} | {ns / per_step:.2f} |')
    print('\n| op | ms per step | result <- operands |\n|---|---:|---|')
    for op, ns in times.most_common(args.top):
      print(f'| {op} | {ns / per_step:.2f} | {op_shapes(hlo, op)} |')


if __name__ == '__main__':
  main(sys.argv[1:])
