"""Configuration C (VGG-16 with 1x1 convs) on ImageNet, the paper's recipe.

`--config=configs/vgg16_c.py:STAGE` selects the training stage (Sec. 3.1;
default s256); every stage validates at its own single test scale. The
whole chain, net A first, evaluations and a results table included, is one
command (see `vgg_jax/recipe.py`)::

    python -m vgg_jax.recipe --net=vgg16_c --root=$ROOT

Stage s256: S=256, lr 1e-2, first four convs and the three FC layers from net A
(the rest std 0.01), validated at Q=256::

    python -m vgg_jax.main --config=configs/vgg16_c.py:s256 \
      --workdir=$ROOT/vgg16_c_s256 \
      --config.train.init_from=$ROOT/vgg11

  Expected (paper, Table 3, dense, Q=256): top-1 / top-5 error 28.1 / 9.4 %.

Stage s384: S=384, lr 1e-3, initialised from the s256 run, validated at Q=384::

    python -m vgg_jax.main --config=configs/vgg16_c.py:s384 \
      --workdir=$ROOT/vgg16_c_s384 \
      --config.train.init_from=$ROOT/vgg16_c_s256

  Expected (paper, Table 3, dense, Q=384): 28.1 / 9.3 %.

Stage jitter: S drawn per image from [256, 512], lr 1e-3, initialised from
the s384 run, validated at Q=384::

    python -m vgg_jax.main --config=configs/vgg16_c.py:jitter \
      --workdir=$ROOT/vgg16_c_jitter \
      --config.train.init_from=$ROOT/vgg16_c_s384

  Expected (paper, Table 3, dense, Q=384): 27.3 / 8.8 %.
"""

from vgg_jax.configs import base


def get_config(stage: str = base.DEFAULT_STAGE):
  """Returns the config of net C at ``stage`` (s256, s384 or jitter)."""
  return base.paper_stage('vgg16_c', stage)
