"""Training-step throughput of vgg_jax, beside Keras (TensorFlow) and PyTorch.

Times the project's own jitted training step (``steps.jit_train_step`` over
the state of ``steps.create_train_state``, as training uses them: the forward
pass, cross-entropy, backward pass, L2 decay and momentum update, with the
state donated) on synthetic uint8 batches already on the device, so the
input pipeline is not measured (``benchmarks/input_pipeline.py`` does that).
Beside it, in the same process, twins of the same net (``peers.py``): Keras 3
trained by ``model.train_on_batch`` on TensorFlow with XLA ``jit_compile``
off and on, and PyTorch eager (channels_last) when torch is installed (the
``bench`` extra); each peer row gives ``vgg_jax / peer``, the ratio of
images/s. One large ``jnp`` matmul's FLOP/s is the yardstick. Like
vgg_jax's programs, the script re-executes itself with huge-page ``malloc``
where that helps (``vgg_jax.host_memory``; ``VGG_JAX_HUGE_PAGES=0`` keeps
it off), and the peers, in the same process, run with it too.

FLOP convention: one training image costs 3 x the forward FLOPs (backward is
about twice the forward), and forward FLOPs = 2 x ``models.count_macs`` (convs
and FC layers only, as the paper's GMAC figures). So images/s x 6 x MACs is the
"model FLOP/s"; XLA's own count of the compiled step is printed beside it as
a check. MFU is model FLOP/s over ``--peak_tflops`` (e.g. 989 for an H100/H200
SXM in dense bf16).

CPU (the defaults there: batch 8, float32, VGG-A and VGG-D, every peer)::

    python benchmarks/train_step.py

The quickstart's net, batch and crop (``--config`` takes the model, batch
and crop size from a config file)::

    python benchmarks/train_step.py --config=configs/quickstart.py --steps=20

GPU/TPU (defaults: batch 256 over all devices, bfloat16, no Keras)::

    python benchmarks/train_step.py --models=vgg16 --peak_tflops=989
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import shlex
import statistics
import sys
import time
from typing import Any, Callable, Sequence

# Runnable as `python benchmarks/train_step.py` from a checkout that is not
# pip-installed (e.g. a fresh GPU machine).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# pylint: disable=g-import-not-at-top,wrong-import-position
from vgg_jax import host_memory

if __name__ == '__main__':  # before JAX, as vgg_jax's programs do
  host_memory.reexec_with_huge_pages()

import jax
import jax.numpy as jnp
import numpy as np
from benchmarks import machine
from benchmarks import peers
from vgg_jax import models
from vgg_jax import sharding
from vgg_jax import steps
from vgg_jax.configs import base
# pylint: enable=g-import-not-at-top,wrong-import-position

PEERS = ('keras_off', 'keras_on', 'torch')


def make_parser() -> argparse.ArgumentParser:
  """The options below; scripts built on this one add their own."""
  p = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument('--config', default=None,
                 help='config file whose model, batch size and crop size '
                      'are the defaults (e.g. configs/quickstart.py); '
                      'without it: the base config, VGG-A and VGG-D at 224')
  p.add_argument('--models', default=None,
                 help='comma-separated vgg_jax model names (default: the '
                      "config's model, or vgg11,vgg16)")
  p.add_argument('--batch_size', type=int, default=None,
                 help="global batch (default: the config's, else 8 on CPU "
                      'and 256 on GPU/TPU)')
  p.add_argument('--dtype', default=None,
                 help='compute dtype (default: float32 on CPU, bfloat16 on '
                      'GPU/TPU); parameters stay float32')
  p.add_argument('--image_size', type=int, default=None,
                 help="square crop side, a multiple of 32 (default: the "
                      "config's crop size, else 224)")
  p.add_argument('--width_multiplier', type=float, default=None,
                 help="scales every width (default: the config's, else 1)")
  p.add_argument('--steps', type=int, default=None,
                 help='timed steps (default: 3 on CPU, 20 on GPU/TPU)')
  p.add_argument('--warmup', type=int, default=None,
                 help='untimed steps after compilation (default: 1 on CPU, '
                      '3 on GPU/TPU)')
  p.add_argument('--peers', default=None,
                 help='comma-separated twins to time beside vgg_jax, of '
                      f'{", ".join(PEERS)}, or none (default on CPU: all, '
                      'torch where installed; elsewhere none)')
  p.add_argument('--matmul_size', type=int, default=None,
                 help='side of the square yardstick matmul (default: 4096 on '
                      'CPU, 8192 on GPU/TPU)')
  p.add_argument('--peak_tflops', type=float,
                 default=float(os.environ.get('PEAK_TFLOPS', 0) or 0),
                 help='hardware peak TFLOP/s in the compute dtype for MFU '
                      '(env PEAK_TFLOPS; 0: no MFU column)')
  p.add_argument('--max_load', type=float, default=0.75 * (os.cpu_count() or 1),
                 help='wait while the 1-minute load average is above this')
  p.add_argument('--load_retries', type=int, default=3,
                 help='waits of --load_wait_s before measuring anyway')
  p.add_argument('--load_wait_s', type=float, default=60.0)
  p.add_argument('--require_accelerator', action='store_true',
                 help='fail unless JAX sees a GPU or TPU')
  p.add_argument('--seed', type=int, default=0)
  return p


def load_config(path: str | None):
  """The ``get_config()`` of a config file, or the base config."""
  if path is None:
    return base.get_config()
  spec = importlib.util.spec_from_file_location('bench_config', path)
  if spec is None or not os.path.isfile(path):
    raise FileNotFoundError(f'--config={path}: no such config file.')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def parse_args(argv: Sequence[str],
               parser: argparse.ArgumentParser | None = None
               ) -> argparse.Namespace:
  """Command-line options; ``None`` defaults depend on the backend/config.

  Args:
    argv: the arguments.
    parser: ``make_parser()`` with a script's own options added (default:
      it).
  """
  p = parser or make_parser()
  args = p.parse_args(argv)
  accel = jax.default_backend() != 'cpu'
  if args.require_accelerator and not accel:
    p.error('--require_accelerator: JAX sees no GPU/TPU (backend '
            f'{jax.default_backend()!r}, devices {jax.devices()}).')
  try:
    args.base_config = load_config(args.config)
  except (FileNotFoundError, AttributeError, SyntaxError) as e:
    p.error(f'--config={args.config}: {e}')
  _set_defaults(args, accel)
  args.models = [m.strip() for m in args.models.split(',') if m.strip()]
  for name in args.models:
    if name not in models.MODEL_NAMES:
      p.error(f'Unknown model {name!r}; valid: '
              f'{", ".join(models.MODEL_NAMES)}.')
  if args.image_size < 32 or args.image_size % 32:
    p.error(f'--image_size={args.image_size} must be a positive multiple of '
            '32 (FC-6 is a (size/32)-wide conv).')
  if args.batch_size < 1 or args.batch_size % jax.device_count():
    p.error(f'--batch_size={args.batch_size} must be a positive multiple of '
            f'the {jax.device_count()} devices.')
  if args.steps < 1 or args.warmup < 0:
    p.error(f'--steps={args.steps} must be >= 1 and --warmup={args.warmup} '
            '>= 0.')
  try:
    args.dtype = jnp.dtype(args.dtype).name
  except TypeError:
    p.error(f'--dtype={args.dtype!r} is not a dtype (e.g. float32, bfloat16).')
  unknown = sorted(set(args.peers) - set(PEERS))
  if unknown:
    p.error(f'--peers: unknown {", ".join(unknown)}; valid: '
            f'{", ".join(PEERS)} or none.')
  if 'torch' in args.peers and not peers.torch_available():
    p.error('--peers=torch: PyTorch is not installed (pip install -e '
            "'.[bench]').")
  return args


def _set_defaults(args: argparse.Namespace, accel: bool) -> None:
  config = args.base_config
  given = args.config is not None
  defaults = dict(
      models=config.model.name if given else 'vgg11,vgg16',
      batch_size=(config.train.batch_size if given
                  else 256 if accel else 8),
      image_size=config.input.crop_size if given else 224,
      width_multiplier=config.model.width_multiplier,
      dtype='bfloat16' if accel else 'float32',
      steps=20 if accel else 3, warmup=3 if accel else 1,
      matmul_size=8192 if accel else 4096)
  for k, v in defaults.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  if args.peers is None:
    args.peers = [] if accel else [
        p for p in PEERS if p != 'torch' or peers.torch_available()]
  else:
    args.peers = [p.strip() for p in args.peers.split(',')
                  if p.strip() and p.strip() != 'none']


def time_steps(run: Callable[[], Any], warmup: int, steps: int) -> list[float]:
  """Seconds of each of ``steps`` calls of ``run`` after ``warmup`` calls.

  ``run`` must block until its work is done.
  """
  for _ in range(warmup):
    run()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  return times


def matmul_flops(n: int, dtype: str, repeats: int = 5) -> float:
  """FLOP/s of an ``n x n @ n x n`` jnp matmul (median of ``repeats``)."""
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
  f = jax.jit(jnp.matmul)
  # On an accelerator one product takes about a millisecond: chain several
  # per timing so dispatch does not count.
  chain = 1 if jax.default_backend() == 'cpu' else 20

  def run():
    out = None
    for _ in range(chain):
      out = f(a, b)
    jax.block_until_ready(out)
  times = time_steps(run, warmup=2, steps=repeats)
  return 2 * n ** 3 * chain / statistics.median(times)


def xla_flops(compiled) -> float | None:
  """XLA's FLOP count of a compiled computation, if the backend reports it."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get('flops')
  return float(flops) if flops else None


def run_config(name: str, args: argparse.Namespace):
  """The run config of one benchmarked model: ``--config`` plus the flags."""
  config = args.base_config.copy_and_resolve_references()
  config.model.name = name
  config.model.dtype = args.dtype
  config.model.width_multiplier = args.width_multiplier
  config.model.fc6_kernel = args.image_size // 32
  config.train.batch_size = args.batch_size
  config.seed = args.seed
  # The net's step on ready crops, as the peers' (the quickstart's on-device
  # augmentation is part of its training loop: benchmarks/training_loop.sh).
  config.input.augment_on_device = False
  return config


def net_spec(config, args: argparse.Namespace) -> peers.NetSpec:
  """What the peers' twins of the ``run_config`` model must match."""
  return peers.NetSpec(
      name=config.model.name, image_size=args.image_size, batch_size=args.batch_size,
      num_classes=config.model.num_classes,
      width_multiplier=args.width_multiplier,
      dropout_rate=config.model.dropout_rate,
      learning_rate=config.train.learning_rate,
      momentum=config.train.momentum, weight_decay=config.train.weight_decay,
      seed=args.seed)


def _macs(config, args: argparse.Namespace) -> int:
  return models.count_macs(config.model.name, args.image_size,
                           width_multiplier=args.width_multiplier,
                           num_classes=config.model.num_classes,
                           fc6_kernel=config.model.fc6_kernel)


def bench_jax(name: str, args: argparse.Namespace) -> dict[str, Any]:
  """Times the training step of ``steps.create_train_state`` for one model."""
  config = run_config(name, args)
  mesh = sharding.create_mesh()
  setup, state = steps.create_train_state(config, mesh)
  num_params = sum(int(np.prod(x.shape))
                   for x in jax.tree.leaves(state.params))

  runner, compile_s = compiled_step(setup, state, config, mesh, name,
                                    args.image_size, args.seed)
  times = time_steps(runner, args.warmup, args.steps)
  return dict(framework=f'vgg_jax (JAX {jax.__version__})', model=name,
              dtype=args.dtype, params=num_params, compile_s=compile_s,
              times=times, macs=_macs(config, args),
              load=machine.load_average(),
              xla_flops_per_step=xla_flops(runner.compiled),
              batch=args.batch_size)


def compiled_step(setup: steps.TrainSetup, state: steps.TrainState,
                  config, mesh, name: str, image_size: int, seed: int
                  ) -> tuple['StepRunner', float]:
  """The compiled train step on a synthetic uint8 batch on the devices.

  Args:
    setup: ``steps.create_train_state``'s setup.
    state: its state (donated to the steps).
    config: the run config (``train.batch_size``, ``model.num_classes``,
      ``train.learning_rate``).
    mesh: the device mesh.
    name: what the runner names in errors.
    image_size: the batch's image side.
    seed: the batch's random seed.

  Returns:
    ``(runner, compile seconds)``.
  """
  batch_size = config.train.batch_size
  rng = np.random.default_rng(seed)
  batch = jax.device_put(dict(
      image=rng.integers(0, 256, (batch_size, image_size, image_size, 3),
                         dtype=np.uint8),
      label=rng.integers(0, config.model.num_classes, batch_size,
                         dtype=np.int32)), sharding.batch_sharding(mesh))
  lr = np.float32(config.train.learning_rate)
  t0 = time.perf_counter()
  compiled = steps.jit_train_step(setup, config).lower(state, batch,
                                                       lr).compile()
  compile_s = time.perf_counter() - t0
  return StepRunner(compiled, state, batch, lr, name), compile_s


class StepRunner:
  """One blocking training step per call, the (donated) state carried over."""

  def __init__(self, compiled, state: steps.TrainState, batch, lr, name: str):
    self.compiled, self.state, self.batch, self.lr = compiled, state, batch, lr
    self.name = name

  def __call__(self) -> None:
    self.state, _, loss = self.compiled(self.state, self.batch, self.lr)
    jax.block_until_ready((self.state, loss))
    if not np.isfinite(float(loss)):
      raise FloatingPointError(f'{self.name}: non-finite loss {float(loss)}.')


def bench_peer(peer: str, name: str, args: argparse.Namespace
               ) -> dict[str, Any]:
  """Times one peer's twin of ``name`` (``peers.py``)."""
  config = run_config(name, args)
  spec = net_spec(config, args)
  if peer == 'torch':
    make = lambda: peers.torch_step(spec)
  else:
    make = lambda: peers.keras_step(spec, jit_compile=peer == 'keras_on')
  row = peers.bench_peer(make, time_steps, args.warmup, args.steps)
  if peer != 'torch':
    import keras  # pylint: disable=g-import-not-at-top
    keras.backend.clear_session()
  row.update(model=name, dtype='float32', macs=_macs(config, args),
             load=machine.load_average(), xla_flops_per_step=None,
             batch=args.batch_size)
  return row


def images_per_s(row: dict[str, Any]) -> float:
  return row['batch'] / statistics.median(row['times'])


def format_table(rows: list[dict[str, Any]], matmul: dict[str, float],
                 peak_tflops: float) -> str:
  """The results as a markdown table; peers get the vgg_jax/peer ratio."""
  head = ['framework', 'model', 'batch', 'dtype', 'params', 'compile s',
          'step ms (median)', 'images/s', 'vgg_jax / this', 'model TFLOP/s',
          '% of matmul FLOP/s', 'XLA TFLOP/step', 'load']
  if peak_tflops:
    head.append(f'MFU (peak {peak_tflops:g} TFLOP/s)')
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  ours = {r['model']: images_per_s(r) for r in rows
          if r['framework'].startswith('vgg_jax')}
  for r in rows:
    t = statistics.median(r['times'])
    ips = images_per_s(r)
    model_flops = 6 * r['macs'] * ips
    ref = matmul.get(r['dtype'])
    mine = ours.get(r['model'])
    cells = [r['framework'], r['model'], str(r['batch']), r['dtype'],
             f'{r["params"]:,}', f'{r["compile_s"]:.1f}', f'{1e3 * t:.1f}',
             f'{ips:.2f}', f'{mine / ips:.2f}x' if mine else '-',
             f'{model_flops / 1e12:.4g}',
             f'{100 * model_flops / ref:.0f}%' if ref else '-',
             (f'{r["xla_flops_per_step"] / 1e12:.4g}'
              if r['xla_flops_per_step'] else '-'), f'{r["load"]:.1f}']
    if peak_tflops:
      cells.append(f'{100 * model_flops / (peak_tflops * 1e12):.1f}%')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def measure_matmul(best: dict[str, float], args: argparse.Namespace,
                   when: str) -> None:
  """Measures the yardstick matmul in float32 and the compute dtype.

  Args:
    best: ``{dtype: FLOP/s}``, updated with the faster of old and new.
    args: the options (``matmul_size``, ``dtype``).
    when: ``'before'`` or ``'after'`` the models, for the printed line.
  """
  for dtype in dict.fromkeys(['float32', args.dtype]):
    flops = matmul_flops(args.matmul_size, dtype)
    best[dtype] = max(best.get(dtype, 0.0), flops)
    print(f'# {args.matmul_size}^2 {dtype} jnp matmul ({when}): '
          f'{flops / 1e12:.3f} TFLOP/s (load {machine.load_average():.2f})',
          flush=True)


def main(argv: Sequence[str]) -> None:
  args = parse_args(argv)
  devices = jax.devices()
  command = [os.path.basename(sys.executable), *sys.argv]
  print(f'# command: {shlex.join(command)}')
  print(f'# host CPU: {machine.describe()}')
  print(f'# {host_memory.describe()}')
  print(f'# JAX {jax.__version__} backend {jax.default_backend()}: '
        f'{len(devices)} x {devices[0].device_kind}')
  loads = machine.wait_for_quiet_machine(args.max_load, args.load_retries,
                                         args.load_wait_s)
  print(f'# 1-min load average before measuring: '
        f'{", ".join(f"{x:.2f}" for x in loads)}', flush=True)
  t_start = time.perf_counter()

  # The matmul runs before and after the models; the faster of the two is
  # the yardstick, so a burst of other work on the machine does not lower it.
  matmul: dict[str, float] = {}
  measure_matmul(matmul, args, 'before')
  rows = []
  for name in args.models:
    rows.append(bench_jax(name, args))
    print(format_table(rows[-1:], matmul, args.peak_tflops).splitlines()[-1],
          flush=True)
    for peer in args.peers:
      rows.append(bench_peer(peer, name, args))
      print(format_table(rows[-1:], matmul, args.peak_tflops).splitlines()[-1],
            flush=True)
  measure_matmul(matmul, args, 'after')
  for dtype, flops in matmul.items():
    print(f'# matmul yardstick {dtype}: {flops / 1e12:.3f} TFLOP/s')

  print()
  print(f'CPU: {machine.describe()}; {host_memory.describe()}')
  print(format_table(rows, matmul, args.peak_tflops))
  print()
  print(f'# {args.steps} timed steps after {args.warmup} warm-up step(s), '
        'median; vgg_jax / this: ratio of images/s (above 1: vgg_jax is '
        'faster); model FLOPs = 6 x forward MACs x batch; % of matmul '
        'compares with the jnp matmul in the same dtype; load: 1-min load '
        'average after the timed steps.')
  print(f'# 1-min load average after measuring: {machine.load_average():.2f}'
        f'; benchmark wall time {time.perf_counter() - t_start:.0f} s')
  print_results(rows, args.peak_tflops)


def print_results(rows: list[dict[str, Any]], peak_tflops: float) -> None:
  """One ``RESULT`` line per vgg_jax row: images/s, and MFU given the peak."""
  for r in rows:
    if r['framework'].startswith('vgg_jax'):
      ips = images_per_s(r)
      mfu = ''
      if peak_tflops:
        util = 6 * r['macs'] * ips / (peak_tflops * 1e12)
        mfu = f', MFU {100 * util:.1f}% of {peak_tflops:g} TFLOP/s'
      print(f'RESULT {r["model"]} {r["dtype"]} batch {r["batch"]} on '
            f'{jax.device_count()} x {jax.devices()[0].device_kind}: '
            f'{ips:.1f} images/s{mfu}')


if __name__ == '__main__':
  main(sys.argv[1:])
