"""vgg_jax: VGG (Simonyan & Zisserman, ICLR 2015) in JAX / Flax NNX."""

__version__ = '0.1.0'


def __getattr__(name):
  # Lazy, so `import vgg_jax` stays light (no JAX/Orbax import).
  if name in ('load_pretrained', 'save_pretrained'):
    from vgg_jax import pretrained  # pylint: disable=g-import-not-at-top
    return getattr(pretrained, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
