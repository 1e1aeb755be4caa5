r"""Prepares a dataset once, as array_record files in a TFDS data dir.

Training prepares the configured dataset on first use anyway; run this to do
it ahead of time (e.g. ImageNet, which takes hours), or on one machine before
several processes read the same data dir.

Examples::

    # Fashion-MNIST from the Debian package's IDX files (seconds).
    python -m vgg_jax.datasets.prepare --dataset=fashion_mnist

    # Your own images, root/<split>/<class>/<image>.
    python -m vgg_jax.datasets.prepare --dataset=image_folder \
        --manual_dir=/data/flowers --data_dir=/data/tfds

    # ImageNet: ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from
    # image-net.org) in --manual_dir; about 160 GB of free disk.
    python -m vgg_jax.datasets.prepare --dataset=imagenet2012 \
        --manual_dir=/data/imagenet_tars --data_dir=/data/tfds
"""

from __future__ import annotations

from typing import Sequence

from absl import app
from absl import flags

from vgg_jax import datasets

_DATASET = flags.DEFINE_string(
    'dataset', 'fashion_mnist',
    "'fashion_mnist', 'image_folder' or a TFDS name such as 'imagenet2012'.")
_DATA_DIR = flags.DEFINE_string(
    'data_dir', None, 'TFDS data dir to prepare into (default: TFDS default, '
    '~/tensorflow_datasets).')
_MANUAL_DIR = flags.DEFINE_string(
    'manual_dir', None, 'IDX files (fashion_mnist), the image root '
    '(image_folder) or the TFDS manual dir (imagenet2012 tars).')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  builder = datasets.get_builder(_DATASET.value, data_dir=_DATA_DIR.value,
                                 manual_dir=_MANUAL_DIR.value)
  datasets.prepare(builder, _MANUAL_DIR.value)
  info = datasets.dataset_info(builder)
  print(f'{info.name} prepared in {builder.data_dir}: {info.num_classes} '
        f'classes, examples per split {dict(info.num_examples)}')


if __name__ == '__main__':
  app.run(main)
