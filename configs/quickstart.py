"""Quickstart: a narrow VGG-A on Fashion-MNIST, multi-scale training, on a laptop CPU.

The embedded default dataset (Debian package `dataset-fashion-mnist`, prepared
once into TFDS array_record files). Net A at 1/8 width, images rescaled so the
smallest side S is drawn from [32, 48] per image, random 32x32 crops and
flips, SGD with momentum and the plateau schedule; validation on the test
split, centre crop at Q = 40.

Command (sets up everything on a fresh machine)::

    make quickstart

or, once installed::

    python -m vgg_jax.main --config=configs/quickstart.py --workdir=workdirs/quickstart

Expected: about 91% test top-1 in under 10 minutes on a 2-core CPU (the
measured numbers are in README.md).
"""

from vgg_jax.configs import base


def get_config():
  """Returns the quickstart config."""
  config = base.get_config()
  config.model.name = 'vgg11'  # net A
  config.model.num_classes = 10  # Fashion-MNIST classes
  config.model.width_multiplier = 0.125  # 8..64 conv channels, FC 512
  config.model.fc6_kernel = 1  # 32 px crops give a 1x1 map after 5 pools
  config.model.init = 'he'  # std 0.01 trains net A too, but slower at 1/8 width

  config.data.dataset = 'fashion_mnist'  # the embedded default
  config.data.train_split = 'train'  # 60k images
  config.data.eval_split = 'test'  # 10k images
  config.data.num_workers = 2  # Grain worker processes (one per core)

  config.input.scale_min = 32  # S_min
  config.input.scale_max = 48  # S_max: multi-scale training
  config.input.crop_size = 32  # training crop
  # He init expects unit-scale inputs; the paper's mean-only subtraction
  # leaves a 0-255 range that makes He-initialised nets diverge.
  config.input.normalization = 'imagenet_mean_std'
  config.input.eval_scales = (40,)  # Q: the middle of [S_min, S_max]

  config.train.batch_size = 128  # global batch
  config.train.eval_batch_size = 500  # divides the 10k test images
  config.train.num_epochs = 8.0  # upper bound; about 3,750 steps
  config.train.learning_rate = 0.02  # initial learning rate
  config.train.plateau_patience = 1  # evaluations without gain before x0.1
  config.train.plateau_max_drops = 2  # two drops fit in the budget
  config.train.eval_every_steps = 470  # about once an epoch
  config.train.log_every_steps = 100  # training-metric period
  config.train.checkpoint_every_steps = 470  # with every validation
  return config
