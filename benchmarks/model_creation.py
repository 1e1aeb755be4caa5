"""Model creation time: ``models.create_model`` vs the same initialiser compiled
with XLA's default optimisation, side by side in one process.

    python benchmarks/model_creation.py [NAME WIDTH ...]

Default pairs: the quickstart net (vgg11_bn at 1/8 width) and VGG-16 at full
width. Each time is from call to initialised arrays, compilation included.
"""

import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# pylint: disable=g-import-not-at-top,wrong-import-position
from vgg_jax import host_memory

if __name__ == '__main__':  # before JAX, as vgg_jax's programs do
  host_memory.reexec_with_huge_pages()

import jax
from flax import nnx
from vgg_jax import models
# pylint: enable=g-import-not-at-top,wrong-import-position


def _timed(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(nnx.state(fn()))
  return time.perf_counter() - start


def _optimised(name: str, options: dict) -> models.VGG:
  return nnx.jit(lambda r: models.VGG(name, rngs=r, **options))(
      nnx.Rngs(params=0, dropout=1))


def main(argv) -> None:
  pairs = list(zip(argv[::2], map(float, argv[1::2]))) or [
      ('vgg11_bn', 0.125), ('vgg16', 1.0)]
  print('| model | width | create_model s | optimised-compile init s |')
  print('|---|---|---:|---:|')
  for name, width in pairs:
    kw = dict(width_multiplier=width, fc6_kernel=7 if width == 1 else 1)
    options = models.ModelOptions.create(**kw).as_dict()
    new = _timed(lambda: models.create_model(name, **kw))
    old = _timed(lambda: _optimised(name, options))
    print(f'| {name} | {width:g} | {new:.1f} | {old:.1f} |')


if __name__ == '__main__':
  main(sys.argv[1:])
