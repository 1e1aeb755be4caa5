"""Sec. 4.1's shallow net B-5x5 on ImageNet, the paper's recipe.

Net B with each pair of 3x3 convs replaced by one 5x5 conv (the same
receptive field, five conv layers in all); the paper trains it to show that
depth with small filters beats fewer, larger ones.

`--config=configs/vgg13_5x5.py:STAGE` selects the training stage (Sec. 3.1;
default s256); every stage validates at its own single test scale. The
whole chain, evaluations and a results table included, is one
command (see `vgg_jax/recipe.py`)::

    python -m vgg_jax.recipe --net=vgg13_5x5 --root=$ROOT

Stage s256: S=256, lr 1e-2, from Glorot initialisation (net A's 3x3 convs do
not fit its 5x5 ones), validated at Q=256::

    python -m vgg_jax.main --config=configs/vgg13_5x5.py:s256 \
      --workdir=$ROOT/vgg13_5x5_s256

  Expected (paper, Sec. 4.1, S=256): top-1 error 7 % higher than net B's
  on a centre crop; no table row.

Stage s384: S=384, lr 1e-3, initialised from the s256 run, validated at Q=384::

    python -m vgg_jax.main --config=configs/vgg13_5x5.py:s384 \
      --workdir=$ROOT/vgg13_5x5_s384 \
      --config.train.init_from=$ROOT/vgg13_5x5_s256

  Expected: not in the paper (Sec. 4.1 trains this net at S=256 only).

Stage jitter: S drawn per image from [256, 512], lr 1e-3, initialised from
the s384 run, validated at Q=384::

    python -m vgg_jax.main --config=configs/vgg13_5x5.py:jitter \
      --workdir=$ROOT/vgg13_5x5_jitter \
      --config.train.init_from=$ROOT/vgg13_5x5_s384

  Expected: not in the paper (Sec. 4.1 trains this net at S=256 only).
"""

from vgg_jax.configs import base


def get_config(stage: str = base.DEFAULT_STAGE):
  """Returns the config of net B-5x5 at ``stage`` (s256, s384 or jitter)."""
  return base.paper_stage('vgg13_5x5', stage)
