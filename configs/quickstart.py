"""Quickstart: a narrow VGG-A on Fashion-MNIST, multi-scale training, on a laptop CPU.

The embedded default dataset (Debian package `dataset-fashion-mnist`, prepared
once into TFDS array_record files). Net A with batch norm at 1/8 width, images
rescaled so the smallest side S is drawn from [32, 36] per image, random 32x32
crops and flips, SGD with momentum and the plateau schedule checked every
epoch; validation on the test split at Q = 32 (the whole image).

Command (sets up everything on a fresh machine)::

    make quickstart

or, once installed::

    python -m vgg_jax.main --config=configs/quickstart.py --workdir=workdirs/quickstart

Expected: 90.8-91.2% test top-1 after 8 epochs (seeds 0-2), about 3
minutes wall on a 2-core CPU once set up (measured; README.md).
"""

from vgg_jax.configs import base


def get_config():
  """Returns the quickstart config."""
  config = base.get_config()
  config.model.name = 'vgg11_bn'  # net A; BN trains it in a few epochs
  config.model.num_classes = 10  # Fashion-MNIST classes
  config.model.width_multiplier = 0.125  # 8..64 conv channels, FC 512
  config.model.fc6_kernel = 1  # 32 px crops give a 1x1 map after 5 pools
  config.model.init = 'he'  # suits BN + ReLU; std 0.01 is the paper's
  config.model.dropout_rate = 0.1  # a net this narrow, trained this briefly, underfits with 0.5

  config.data.dataset = 'fashion_mnist'  # the embedded default
  config.data.train_split = 'train'  # 60k images
  config.data.eval_split = 'test'  # 10k images
  config.data.num_workers = 0  # no workers: the host only gathers images (augment_on_device)
  config.data.cache_decoded_mb = 200.0  # bound on the decoded split held in memory (141 MiB)
  config.data.eval_num_workers = 0  # 10k tiny test images: cheaper in-process than starting workers

  config.input.scale_min = 32  # S_min
  config.input.scale_max = 36  # S_max: multi-scale training; larger S crops
  # away sleeves and soles that tell the classes apart
  config.input.crop_size = 32  # training crop
  config.input.augment_on_device = True  # rescale-crop-flip in the train step: the CPU cores stay the step's
  config.input.pca_sigma = 0.0  # grey images: colour noise adds tints no test image has
  # He init expects unit-scale inputs; the paper's mean-only subtraction
  # leaves a 0-255 range that makes He-initialised nets diverge.
  config.input.normalization = 'imagenet_mean_std'
  config.input.eval_scales = (32,)  # Q: the whole 32x32 image

  config.train.batch_size = 128  # global batch
  config.train.eval_batch_size = 500  # divides the 10k test images
  config.train.num_epochs = 8.0  # upper bound; 3,744 steps
  config.train.learning_rate = 0.05  # initial learning rate (BN allows more)
  config.train.plateau_patience = 1  # an epoch without gain: x0.1
  config.train.plateau_min_delta = 0.002  # top-1 gains below 0.2% are a plateau
  config.train.plateau_max_drops = 2  # two drops fit in the budget
  config.train.eval_every_steps = 468  # every epoch: half-epoch checks cost time and drop on noise
  config.train.log_every_steps = 100  # training-metric period
  config.train.checkpoint_every_steps = 468  # with every validation
  return config
