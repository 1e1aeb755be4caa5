"""Fine-tuning step cost: full fine-tune vs frozen trunk vs FC-8 only.

Times the project's jitted training step (``steps.create_train_state`` +
``steps.jit_train_step``, as training uses them) for each ``train.freeze``
choice on synthetic uint8 batches already on the device: ``none`` (every
layer trains), ``trunk`` (the conv trunk frozen: the step differentiates
only FC-6..FC-8, so no backward pass runs through the convs) and
``all_but_fc8`` (a linear classifier on FC-7). Prints the CPU model, its
vector/matrix ISA flags, images/s per choice and the speed-up over ``none``.

CPU (defaults: VGG-16 at 224 x 224, batch 8, float32, 3 warm-up + 5 timed
steps; a few minutes on two cores)::

    python benchmarks/finetune_step.py

Target (issue 11): the frozen trunk at least 2x faster than full fine-tuning.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time
from typing import Any, Sequence

# Runnable as `python benchmarks/finetune_step.py` from a checkout that is
# not pip-installed; train_step (this directory) has the timing helpers.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# pylint: disable=g-import-not-at-top,wrong-import-position
from vgg_jax import host_memory

if __name__ == '__main__':  # before JAX, as vgg_jax's programs do
  host_memory.reexec_with_huge_pages()

import jax
import numpy as np
from benchmarks import machine
from benchmarks import train_step
from vgg_jax import finetune
from vgg_jax import models
from vgg_jax import sharding
from vgg_jax import steps
from vgg_jax.configs import base
# pylint: enable=g-import-not-at-top,wrong-import-position


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument('--model', default='vgg16', choices=models.MODEL_NAMES)
  p.add_argument('--batch_size', type=int, default=8)
  p.add_argument('--image_size', type=int, default=224,
                 help='square crop side, a multiple of 32')
  p.add_argument('--width_multiplier', type=float, default=1.0,
                 help='scales every width (for smoke runs)')
  p.add_argument('--freeze', default=','.join(finetune.FREEZE_CHOICES),
                 help='comma-separated train.freeze choices; the first is '
                      'the baseline of the ratios')
  p.add_argument('--warmup', type=int, default=3,
                 help='untimed steps after compilation')
  p.add_argument('--steps', type=int, default=5, help='timed steps')
  p.add_argument('--max_load', type=float, default=1.5,
                 help='wait while the 1-minute load average is above this')
  p.add_argument('--load_retries', type=int, default=3)
  p.add_argument('--load_wait_s', type=float, default=60.0)
  args = p.parse_args(argv)
  args.freeze = [f.strip() for f in args.freeze.split(',') if f.strip()]
  for choice in args.freeze:
    if choice not in finetune.FREEZE_CHOICES:
      p.error(f'--freeze: unknown choice {choice!r}; valid: '
              f'{", ".join(finetune.FREEZE_CHOICES)}.')
  if args.image_size < 32 or args.image_size % 32:
    p.error(f'--image_size={args.image_size} must be a multiple of 32.')
  return args


def bench(freeze: str, args: argparse.Namespace) -> dict[str, Any]:
  """Compiles and times the step of one ``train.freeze`` choice."""
  config = base.get_config()
  config.model.name = args.model
  config.model.width_multiplier = args.width_multiplier
  config.model.fc6_kernel = args.image_size // 32
  config.train.batch_size = args.batch_size
  config.train.freeze = freeze
  mesh = sharding.create_mesh()
  setup, state = steps.create_train_state(config, mesh)
  trainable, _ = finetune.split_trainable(state.params, setup.trainable)
  runner, compile_s = train_step.compiled_step(
      setup, state, config, mesh, f'{args.model} freeze={freeze}',
      args.image_size, seed=0)
  times = train_step.time_steps(runner, args.warmup, args.steps)
  return dict(freeze=freeze, compile_s=compile_s, step_s=statistics.median(
      times), trainable=sum(int(np.prod(x.shape))
                            for x in jax.tree.leaves(trainable)),
              load=machine.load_average())


def main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  print(f'# CPU: {machine.describe()}')
  print(f'# JAX {jax.__version__}, backend {jax.default_backend()}, '
        f'{jax.device_count()} device(s); {args.model} at '
        f'{args.image_size}px, batch {args.batch_size}, width x'
        f'{args.width_multiplier:g}, {args.warmup} warm-up + {args.steps} '
        'timed steps (median)')
  loads = machine.wait_for_quiet_machine(args.max_load, args.load_retries,
                                            args.load_wait_s)
  print(f'# load average before: {loads[-1]:.2f}')
  rows = []
  for freeze in args.freeze:
    rows.append(bench(freeze, args))
    r = rows[-1]
    print(f'# {freeze}: compiled in {r["compile_s"]:.1f} s, '
          f'{r["step_s"]:.3f} s/step (load {r["load"]:.2f})', flush=True)
  base_s = rows[0]['step_s']
  print(f'\n| train.freeze | trainable params | s/step | images/s | '
        f'speed-up vs {rows[0]["freeze"]} |')
  print('|---|---:|---:|---:|---:|')
  for r in rows:
    print(f'| {r["freeze"]} | {r["trainable"]:,} | {r["step_s"]:.3f} | '
          f'{args.batch_size / r["step_s"]:.2f} | '
          f'{base_s / r["step_s"]:.2f}x |')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
