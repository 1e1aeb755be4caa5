"""Training input-pipeline throughput: vgg_jax's Grain pipeline beside PIL.

Makes ImageNet-like JPEGs (500x375 or 375x500, quality 90) from the real
photographs bundled with scikit-image (no downloads), prepares them as an
image-folder dataset (array_record), then times, in the same run:

* ``vgg_jax``: `input_pipeline.create_train_iterator` (decode with JPEG
  draft, rescale-and-crop of the crop region only, flip, PCA colour shift
  through a lookup table; uint8 batches);
* ``PIL`` baseline, the torchvision way: decode, ``convert('RGB')``, resize
  the whole image to smallest side S, random crop, flip, then to float32 in
  [0, 1], PCA lighting and mean/std normalisation on the host; also its uint8
  variant (stopping before the float conversion, so without the PCA
  lighting).

Two measurements per scale range, each repeated ``--rounds`` times (best
kept): one core, where the three pipelines run in the main process without
threads and take turns batch by batch, in images per CPU-second (robust to
other load on the machine); and all cores, in wall-clock images/s and in
images per CPU-second of all processes, with ``--workers`` Grain worker
processes against as many independent baseline processes (the baseline's
best case: nothing is sent between processes).
Last, the host-to-device side of a batch: uint8 transfer plus on-device
normalisation against normalising to float32 on the host and transferring
that.

Usage (3-5 minutes on 2 cores, depending on other load)::

    python benchmarks/input_pipeline.py
    python benchmarks/input_pipeline.py --workers=8 --num_images=1024
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

# Runnable as `python benchmarks/input_pipeline.py` from a plain checkout.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# pylint: disable=g-import-not-at-top,wrong-import-position
from vgg_jax import input_pipeline
from vgg_jax import preprocessing
from vgg_jax.configs import base
from vgg_jax.datasets import testing

_PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket', 'hubble_deep_field',
           'immunohistochemistry', 'retina', 'stereo_motorcycle')


def _photos() -> list[np.ndarray]:
  import skimage.data  # Only the benchmark needs scikit-image.
  photos = []
  for name in _PHOTOS:
    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disp)
      image = image[0]
    photos.append(np.asarray(image, np.uint8)[..., :3])
  return photos


def make_jpegs(num_images: int, seed: int = 0) -> list[bytes]:
  """ImageNet-like JPEGs: random crops of the photos, 500x375, quality 90."""
  rng = np.random.default_rng(seed)
  photos = _photos()
  jpegs = []
  for i in range(num_images):
    photo = Image.fromarray(photos[i % len(photos)])
    width, height = photo.size
    portrait = rng.random() < 0.25
    aspect = 3 / 4 if portrait else 4 / 3
    # Largest window of that aspect, then a random 70-100% of it.
    crop_w = min(width, height * aspect) * rng.uniform(0.7, 1.0)
    crop_h = crop_w / aspect
    left = rng.uniform(0, width - crop_w)
    top = rng.uniform(0, height - crop_h)
    image = photo.resize((375, 500) if portrait else (500, 375),
                         Image.Resampling.BICUBIC,
                         box=(left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
      image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buffer = io.BytesIO()
    image.save(buffer, 'JPEG', quality=90)
    jpegs.append(buffer.getvalue())
  return jpegs


class TorchvisionWay:
  """The PIL + NumPy baseline: whole-image resize, host-side float ops."""

  def __init__(self, jpegs: Sequence[bytes], scale_min: int, scale_max: int,
               crop: int, to_float: bool, seed: int = 0):
    self._jpegs = jpegs
    self._scale_min, self._scale_max = scale_min, scale_max
    self._crop = crop
    self._to_float = to_float
    self._seed = seed
    self._mean = np.array(preprocessing.IMAGENET_MEAN, np.float32)
    self._std = np.array(preprocessing.IMAGENET_STD, np.float32)

  def __call__(self, index: int) -> np.ndarray:
    rng = np.random.default_rng((self._seed, index))
    image = Image.open(io.BytesIO(self._jpegs[index % len(self._jpegs)]))
    image = image.convert('RGB')
    scale = int(rng.integers(self._scale_min, self._scale_max + 1))
    image = image.resize(preprocessing.rescaled_size(image.size, scale),
                         Image.Resampling.BILINEAR)
    top = int(rng.integers(0, image.size[1] - self._crop + 1))
    left = int(rng.integers(0, image.size[0] - self._crop + 1))
    image = image.crop((left, top, left + self._crop, top + self._crop))
    if rng.random() < 0.5:
      image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.asarray(image)
    if not self._to_float:
      return pixels
    pixels = pixels.astype(np.float32) / 255.0
    pixels += preprocessing.pca_color_shift(rng, 0.1) / 255.0
    return (pixels - self._mean) / self._std


class _Clock:
  """Wall-clock and this process's CPU time (which other load hardly moves)."""

  def __enter__(self):
    self._wall, self._cpu = time.perf_counter(), time.process_time()
    return self

  def __exit__(self, *exc):
    self.wall = time.perf_counter() - self._wall
    self.cpu = time.process_time() - self._cpu


def _baseline_batches(fn: TorchvisionWay, batch: int, batches: int,
                      offset: int = 0) -> Iterator[np.ndarray]:
  for b in range(batches):
    first = offset + b * batch
    yield np.stack([fn(first + i) for i in range(batch)])


def _baseline_process(args: tuple[TorchvisionWay, int, int, int]
                      ) -> tuple[int, float, float, float]:
  """One baseline process's own loop: (images, start, end, CPU seconds)."""
  fn, batch, batches, offset = args
  fn(offset)  # warm-up
  start, cpu = time.time(), time.process_time()
  for _ in _baseline_batches(fn, batch, batches, offset):
    pass
  return batch * batches, start, time.time(), time.process_time() - cpu


def _baseline_total(fn: TorchvisionWay, processes: int, batch: int,
                    batches: int) -> tuple[float, float]:
  """Throughput of ``processes`` independent baseline loops running together.

  No results cross process boundaries, so this is the baseline's best case
  (ideal scaling); the Grain pipeline's total includes moving every batch to
  the main process.

  Args:
    fn: the per-image transform.
    processes: number of processes.
    batch: images per batch.
    batches: batches per process.

  Returns:
    (images/s from the first start to the last end, images per CPU-second
    of all the processes).
  """
  with multiprocessing.get_context('spawn').Pool(processes) as pool:
    pool.map(fn, range(processes))  # start the workers
    runs = pool.map(_baseline_process,
                    [(fn, batch, batches, p * batch * batches)
                     for p in range(processes)], chunksize=1)
  images = sum(run[0] for run in runs)
  wall = max(run[2] for run in runs) - min(run[1] for run in runs)
  return images / wall, images / sum(run[3] for run in runs)


def _tree_cpu() -> float:
  """CPU seconds used so far by this process and its live descendants."""
  import psutil  # Installed with the test extras (via ipykernel).
  total = 0.0
  me = psutil.Process()
  for process in [me] + me.children(recursive=True):
    try:
      times = process.cpu_times()
      total += times.user + times.system
    except psutil.NoSuchProcess:
      pass
  return total


def _buffered_batches(config, batch: int) -> int:
  """Batches the Grain workers can hold ready at most."""
  return config.data.num_workers * (
      config.data.prefetch_buffer_size +
      -(-config.data.read_buffer_size // batch))


def _vgg_jax_total(config, batch: int, batches: int) -> tuple[float, float]:
  """(images/s, images per CPU-second of all processes) of the pipeline."""
  iterator = input_pipeline.create_train_iterator(config,
                                                  global_batch_size=batch)
  # Start the workers and drain what they prefetched meanwhile; the timed
  # window is several times longer than what they can hold ready.
  for _ in range(_buffered_batches(config, batch) + 2):
    next(iterator)
  cpu = _tree_cpu()
  with _Clock() as clock:
    for _ in range(batches):
      next(iterator)
  cpu = _tree_cpu() - cpu
  iterator.close()
  return batch * batches / clock.wall, batch * batches / cpu


def _one_core(config, jpegs: Sequence[bytes], batch: int, batches: int
              ) -> dict[str, float]:
  """Images per CPU-second of each pipeline, batch by batch in turn.

  Interleaving the pipelines batch by batch exposes them to the same load.

  Args:
    config: the benchmark config (scales set).
    jpegs: the encoded images (the baseline reads them from memory).
    batch: images per batch.
    batches: timed batches per pipeline.

  Returns:
    Pipeline name -> images per CPU-second.
  """
  config.data.num_workers = 0
  config.data.read_threads = 0  # everything in this thread: one core
  ours = input_pipeline.create_train_iterator(config, global_batch_size=batch)
  smin, smax = config.input.scale_min, config.input.scale_max
  crop = config.input.crop_size
  runners = {
      'vgg_jax (Grain)': ours,
      'PIL, torchvision way': _baseline_batches(
          TorchvisionWay(jpegs, smin, smax, crop, True), batch, batches + 1),
      'PIL, torchvision way (uint8 out)': _baseline_batches(
          TorchvisionWay(jpegs, smin, smax, crop, False), batch, batches + 1),
  }
  cpu = dict.fromkeys(runners, 0.0)
  for step in range(batches + 1):
    for name, runner in runners.items():
      with _Clock() as clock:
        next(runner)
      if step:  # the first batch warms up
        cpu[name] += clock.cpu
  ours.close()
  return {name: batch * batches / seconds for name, seconds in cpu.items()}


def _transfer(batch: int, crop: int, repeats: int) -> list[str]:
  """uint8 to the device + normalise there, vs float32 made on the host."""
  import jax
  images = np.random.default_rng(0).integers(0, 256, (batch, crop, crop, 3),
                                             dtype=np.uint8)
  mean = np.array(preprocessing.IMAGENET_MEAN, np.float32) * 255
  std = np.array(preprocessing.IMAGENET_STD, np.float32) * 255
  on_device = jax.jit(lambda x: preprocessing.normalize(
      x, 'imagenet_mean_std'))
  ident = jax.jit(lambda x: x + 0)

  def uint8_path():
    return on_device(jax.device_put(images))

  def float_path():
    host = (images.astype(np.float32) - mean) / std
    return ident(jax.device_put(host))

  rows = []
  for name, fn in (('uint8 -> device, normalize on device', uint8_path),
                   ('normalize on host -> float32 -> device', float_path)):
    fn().block_until_ready()
    best = float('inf')
    for _ in range(repeats):
      start = time.perf_counter()
      fn().block_until_ready()
      best = min(best, time.perf_counter() - start)
    rows.append(f'| {name} | {jax.devices()[0].platform} | '
                f'{best * 1e3:.1f} ms | {batch / best:.0f} |')
  return rows


def _machine() -> str:
  try:
    lscpu = subprocess.run(['lscpu'], capture_output=True, text=True,
                           check=False).stdout
    model = next((l.split(':', 1)[1].strip() for l in lscpu.splitlines()
                  if l.startswith('Model name')), platform.processor())
  except OSError:
    model = platform.processor()
  load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
  return (f'{model}, {os.cpu_count()} cores, Python {platform.python_version()}'
          f', Pillow {Image.__version__}, load average {load:.1f} at start')


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--num_images', type=int, default=256)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--batches', type=int, default=8,
                      help='timed batches per pipeline and round on one core '
                      '(with workers: at least 4x what they hold ready)')
  parser.add_argument('--workers', type=int, default=os.cpu_count() or 1,
                      help='Grain workers / Pool processes for the totals')
  parser.add_argument('--read_threads', type=int, default=None,
                      help='threads per Grain worker (default: the config)')
  parser.add_argument('--scales', default='256:256,256:512',
                      help='comma-separated S_min:S_max')
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--workdir', default=None,
                      help='where to write the JPEGs (default: a temp dir)')
  args = parser.parse_args(argv)

  print('command: python benchmarks/input_pipeline.py ' +
        ' '.join(shlex.quote(a) for a in (argv or sys.argv[1:])))
  print(f'machine: {_machine()}')
  workdir = args.workdir or tempfile.mkdtemp(prefix='vgg_jax_bench_')
  try:
    _run(args, workdir)
  finally:
    if not args.workdir:
      shutil.rmtree(workdir, ignore_errors=True)


def _run(args: argparse.Namespace, workdir: str) -> None:
  """Makes the images and prints every measurement."""
  start = time.perf_counter()
  jpegs = make_jpegs(args.num_images)
  root = testing.write_image_folder(
      os.path.join(workdir, 'images'),
      {f'train/c{i % 10}/{i:05d}.jpg': data for i, data in enumerate(jpegs)})
  config = base.get_config()
  config.data.dataset = 'image_folder'
  config.data.manual_dir = root
  config.data.data_dir = os.path.join(workdir, 'tfds')
  if args.read_threads is None:
    args.read_threads = config.data.read_threads
  input_pipeline.get_dataset_info(config)
  print(f'{len(jpegs)} JPEGs, mean {np.mean([len(j) for j in jpegs]) / 1e3:.0f}'
        f' kB, prepared in {time.perf_counter() - start:.1f} s')

  one_core, total = {}, {}
  for round_index in range(args.rounds):
    for scales in args.scales.split(','):
      smin, smax = (int(s) for s in scales.split(':'))
      config.input.scale_min, config.input.scale_max = smin, smax
      for name, rate in _one_core(config, jpegs, args.batch_size,
                                  args.batches).items():
        one_core[scales, name] = max(rate, one_core.get((scales, name), 0))
        print(f'round {round_index} S={scales} one core, {name}: {rate:.0f} '
              'images per CPU-second', flush=True)
      config.data.num_workers = args.workers
      config.data.read_threads = args.read_threads
      window = max(args.batches,
                   4 * _buffered_batches(config, args.batch_size))
      runs = {'vgg_jax (Grain)': lambda: _vgg_jax_total(
          config, args.batch_size, window)}
      for to_float in (True, False):
        fn = TorchvisionWay(jpegs, smin, smax, config.input.crop_size,
                            to_float)
        name = 'PIL, torchvision way' + ('' if to_float else ' (uint8 out)')
        runs[name] = lambda fn=fn: _baseline_total(
            fn, args.workers, args.batch_size, window // args.workers)
      for name, run in runs.items():
        rate, per_cpu = run()
        old_rate, old_cpu = total.get((scales, name), (0, 0))
        total[scales, name] = (max(rate, old_rate), max(per_cpu, old_cpu))
        print(f'round {round_index} S={scales} {args.workers} processes, '
              f'{name}: {rate:.0f} images/s, {per_cpu:.0f} per CPU-second',
              flush=True)

  print('\nOne core (main process, no threads; the pipelines take turns '
        'batch by batch): images per CPU-second.\n')
  print('| S | pipeline | images per CPU-second | vs PIL float | '
        'vs PIL uint8 |')
  print('|---|---|---|---|---|')
  for (scales, name), rate in one_core.items():
    float_rate = one_core[scales, 'PIL, torchvision way']
    uint8_rate = one_core[scales, 'PIL, torchvision way (uint8 out)']
    print(f'| {scales.replace(":", "-")} | {name} | {rate:.0f} | '
          f'{rate / float_rate:.2f}x | {rate / uint8_rate:.2f}x |')
  print(f'\n{args.workers} processes: {args.workers} Grain workers '
        f'({args.read_threads} threads each) feeding the main process, against'
        f' {args.workers} independent baseline processes (ideal scaling, no '
        'transfer). CPU-seconds count every process of the pipeline (Grain: '
        'the main process too); wall-clock rates depend on other load.\n')
  print('| S | pipeline | images/s total | images/s per process | '
        'images per CPU-second | vs PIL float (CPU) |')
  print('|---|---|---|---|---|---|')
  for (scales, name), (rate, per_cpu) in total.items():
    baseline = total[scales, 'PIL, torchvision way'][1]
    print(f'| {scales.replace(":", "-")} | {name} | {rate:.0f} | '
          f'{rate / args.workers:.0f} | {per_cpu:.0f} | '
          f'{per_cpu / baseline:.2f}x |')

  print('\nHost to device, one batch of 256 x 224 x 224 x 3 (best of 5):\n')
  print('| path | device | time | images/s |')
  print('|---|---|---|---|')
  for row in _transfer(256, config.input.crop_size, 5):
    print(row)
  print(f'\ntotal time {time.perf_counter() - start:.0f} s')


if __name__ == '__main__':
  main()
