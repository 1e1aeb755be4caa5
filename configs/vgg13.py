"""Configuration B (VGG-13) trained on ImageNet at S=256, the paper's recipe.

First four convs and the three FC layers from a trained net A.

Command::

    python -m vgg_jax.main --config=configs/vgg13.py --workdir=$WORKDIR \
      --config.train.init_from=WORKDIR_OF_VGG11

Expected (paper, Table 3, single scale Q=256): top-1 / top-5 error 28.7 / 9.9 %.
For S=384 add `--config.input.scale_min=384 --config.input.scale_max=384
--config.train.learning_rate=1e-3 --config.train.init_from=<S=256 run>`; for
multi-scale S in [256, 512] set scale_min=256, scale_max=512 and init from the
S=384 run.
"""

from vgg_jax.configs import base


def get_config():
  """Returns the config for net B."""
  config = base.get_config()
  config.model.name = 'vgg13'  # paper configuration B
  config.train.init_from = ''  # set to a trained vgg11 workdir (paper: init from net A)
  return config
