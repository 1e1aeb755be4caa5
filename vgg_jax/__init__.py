"""vgg_jax: VGG (Simonyan & Zisserman, ICLR 2015) in JAX / Flax NNX."""

__version__ = '0.1.0'
