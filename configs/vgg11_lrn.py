"""Configuration A-LRN (VGG-11 with LRN) trained on ImageNet at S=256, the paper's recipe.

Random init; the paper found LRN does not help.

Command::

    python -m vgg_jax.main --config=configs/vgg11_lrn.py --workdir=$WORKDIR

Expected (paper, Table 3, single scale Q=256): top-1 / top-5 error 29.7 / 10.5 %.
For S=384 add `--config.input.scale_min=384 --config.input.scale_max=384
--config.train.learning_rate=1e-3 --config.train.init_from=<S=256 run>`; for
multi-scale S in [256, 512] set scale_min=256, scale_max=512 and init from the
S=384 run.
"""

from vgg_jax.configs import base


def get_config():
  """Returns the config for net A-LRN."""
  config = base.get_config()
  config.model.name = 'vgg11_lrn'  # paper configuration A-LRN
  return config
