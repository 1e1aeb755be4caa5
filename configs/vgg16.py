"""Configuration D (VGG-16) on ImageNet, the paper's recipe.

`--config=configs/vgg16.py:STAGE` selects the training stage (Sec. 3.1;
default s256); every stage validates at its own single test scale. The
whole chain, net A first, evaluations and a results table included, is one
command (see `vgg_jax/recipe.py`)::

    python -m vgg_jax.recipe --net=vgg16 --root=$ROOT

Stage s256: S=256, lr 1e-2, first four convs and the three FC layers from net A
(the rest std 0.01), validated at Q=256::

    python -m vgg_jax.main --config=configs/vgg16.py:s256 \
      --workdir=$ROOT/vgg16_s256 \
      --config.train.init_from=$ROOT/vgg11

  Expected (paper, Table 3, dense, Q=256): top-1 / top-5 error 27.0 / 8.8 %;
  multi-scale Q in {224, 256, 288} (Table 4): 26.6 / 8.6 %.

Stage s384: S=384, lr 1e-3, initialised from the s256 run, validated at Q=384::

    python -m vgg_jax.main --config=configs/vgg16.py:s384 \
      --workdir=$ROOT/vgg16_s384 \
      --config.train.init_from=$ROOT/vgg16_s256

  Expected (paper, Table 3, dense, Q=384): 26.8 / 8.7 %.

Stage jitter: S drawn per image from [256, 512], lr 1e-3, initialised from
the s384 run, validated at Q=384::

    python -m vgg_jax.main --config=configs/vgg16.py:jitter \
      --workdir=$ROOT/vgg16_jitter \
      --config.train.init_from=$ROOT/vgg16_s384

  Expected (paper, Table 3, dense, Q=384): 25.6 / 8.1 %; multi-scale Q in
  {256, 384, 512} (Tables 4, 5): dense 24.8 / 7.5, multi-crop 24.6 / 7.5,
  multi-crop & dense 24.4 / 7.2 %.
"""

from vgg_jax.configs import base


def get_config(stage: str = base.DEFAULT_STAGE):
  """Returns the config of net D at ``stage`` (s256, s384 or jitter)."""
  return base.paper_stage('vgg16', stage)
