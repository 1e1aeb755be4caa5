"""Configuration A (VGG-11) on ImageNet, the paper's recipe.

`--config=configs/vgg11.py:STAGE` selects the training stage (Sec. 3.1;
default s256); every stage validates at its own single test scale. The
whole chain, evaluations and a results table included, is one
command (see `vgg_jax/recipe.py`)::

    python -m vgg_jax.recipe --net=vgg11 --root=$ROOT

Stage s256: S=256, lr 1e-2, from random weights (std 0.01), validated at Q=256::

    python -m vgg_jax.main --config=configs/vgg11.py:s256 \
      --workdir=$ROOT/vgg11

  Expected (paper, Table 3, dense, Q=256): top-1 / top-5 error 29.6 / 10.4 %.

Stage s384: S=384, lr 1e-3, initialised from the s256 run, validated at Q=384::

    python -m vgg_jax.main --config=configs/vgg11.py:s384 \
      --workdir=$ROOT/vgg11_s384 \
      --config.train.init_from=$ROOT/vgg11

  Expected: not in the paper (Table 3 lists this net at S=256 only).

Stage jitter: S drawn per image from [256, 512], lr 1e-3, initialised from
the s384 run, validated at Q=384::

    python -m vgg_jax.main --config=configs/vgg11.py:jitter \
      --workdir=$ROOT/vgg11_jitter \
      --config.train.init_from=$ROOT/vgg11_s384

  Expected: not in the paper (Table 3 lists this net at S=256 only).
"""

from vgg_jax.configs import base


def get_config(stage: str = base.DEFAULT_STAGE):
  """Returns the config of net A at ``stage`` (s256, s384 or jitter)."""
  return base.paper_stage('vgg11', stage)
