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

from absl import flags

from vgg_jax import cli
from vgg_jax import datasets


def define_flags(flag_values: flags.FlagValues) -> None:
  """Registers the program's flags.

  Args:
    flag_values: where to register them (``flags.FLAGS`` for the program).
  """
  flags.DEFINE_string(
      'dataset', 'fashion_mnist',
      "'fashion_mnist', 'image_folder' or a TFDS name such as 'imagenet2012'.",
      flag_values=flag_values)
  flags.DEFINE_string(
      'data_dir', None, 'TFDS data dir to prepare into (default: TFDS '
      'default, ~/tensorflow_datasets).', flag_values=flag_values)
  flags.DEFINE_string(
      'manual_dir', None, 'IDX files (fashion_mnist), the image root '
      '(image_folder) or the TFDS manual dir (imagenet2012 tars).',
      flag_values=flag_values)


def main(flag_values: flags.FlagValues) -> int:
  """Prepares ``--dataset`` and prints what it holds.

  Args:
    flag_values: the parsed flags of ``define_flags``.

  Returns:
    0; user errors raise (``cli`` prints them on one line and exits 1).
  """
  f = flag_values
  builder = datasets.get_builder(f.dataset, data_dir=f.data_dir,
                                 manual_dir=f.manual_dir)
  datasets.ensure_prepared(builder, f.manual_dir)
  info = datasets.dataset_info(builder)
  print(f'{info.name} prepared in {builder.data_dir}: {info.num_classes} '
        f'classes, examples per split {dict(info.num_examples)}')
  return 0


if __name__ == '__main__':
  cli.run(define_flags, main)
