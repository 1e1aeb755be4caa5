"""Perceptual losses on a frozen VGG: feature reconstruction and style.

* Feature reconstruction (Johnson et al., "Perceptual losses for real-time
  style transfer and super-resolution", 2016): per layer ``j``, the mean
  over its ``C*H*W`` elements of ``(phi_j(x) - phi_j(y))**2`` (``'l2'``) or
  ``|phi_j(x) - phi_j(y)|`` (``'l1'``); by default on ``relu1_2``,
  ``relu2_2``, ``relu3_3`` and ``relu4_3`` (net D).
* Style (Gatys et al., "Image style transfer using convolutional neural
  networks", 2016): per layer, the squared Frobenius distance between Gram
  matrices ``G = F^T F / (C*H*W)`` (``F``: the ``H*W x C`` activations), as
  Johnson et al. write it; Gatys et al.'s ``E_l`` is a quarter of it. By
  default on ``relu1_1`` ... ``relu5_1``.

Each loss is the weighted sum over its layers (``{layer: weight}``, weight
1 by default), per example; ``reduction`` then takes the batch mean
(default), the sum, or keeps the ``(N,)`` values (``'none'``).

Images are float ``(N, H, W, 3)`` RGB in [0, 1]; the loss applies the
weights' own normalisation (and channel order). The weights are frozen:
gradients flow to the images only. A ``PerceptualLoss`` is a pytree (its
weights are leaves), so pass it into jitted functions as an argument rather
than closing over it, which would bake the weights into the program::

    loss = perceptual.PerceptualLoss.from_pretrained('weights/vgg16_tv')

    @jax.jit
    def objective(loss, images, content, style):
      return loss(images, content, style)  # content + style, one forward

    grads = jax.grad(objective, argnums=1)(loss, images, content, style)

The methods are jitted already, so calling them directly is fast too.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping

from flax import nnx
from flax import struct
import jax
import jax.numpy as jnp

from vgg_jax import layers as named_layers
from vgg_jax import models
from vgg_jax import preprocessing
from vgg_jax import pretrained

JOHNSON_LAYERS = ('relu1_2', 'relu2_2', 'relu3_3', 'relu4_3')
GATYS_LAYERS = ('relu1_1', 'relu2_1', 'relu3_1', 'relu4_1', 'relu5_1')
DISTANCES = ('l2', 'l1')
REDUCTIONS = ('mean', 'sum', 'none')

LayerWeights = Iterable[str] | Mapping[str, float]
# Targets: images, or their activations/Grams as ``features``/``grams`` give.
Target = jax.Array | Mapping[str, jax.Array]


def gram_matrix(features: jax.Array) -> jax.Array:
  """``F^T F / (C*H*W)`` of ``(N, H, W, C)`` activations, ``(N, C, C)`` f32."""
  n, h, w, c = features.shape
  f = features.reshape(n, h * w, c).astype(jnp.float32)
  return jnp.einsum('npc,npd->ncd', f, f) / (c * h * w)


def _weighted(model_name: str, layers: LayerWeights,
              what: str) -> tuple[tuple[str, float], ...]:
  if isinstance(layers, str):
    layers = (layers,)
  pairs = (tuple((k, float(v)) for k, v in layers.items())
           if isinstance(layers, Mapping) else tuple((k, 1.0) for k in layers))
  try:
    named_layers.check_layers(model_name, [k for k, _ in pairs])
  except ValueError as e:
    raise ValueError(f'Bad {what} layers: {e}') from None
  return pairs


def _frozen(value):
  # Integer and key leaves (dropout RNG state) have no gradient to stop.
  if jnp.issubdtype(value.dtype, jnp.inexact):
    return jax.lax.stop_gradient(value)
  return value


def _reduce(per_example: jax.Array, reduction: str) -> jax.Array:
  if reduction == 'mean':
    return per_example.mean()
  if reduction == 'sum':
    return per_example.sum()
  return per_example


@struct.dataclass
class PerceptualLoss:
  """Feature-reconstruction and style losses on a frozen VGG.

  Build with ``from_model`` or ``from_pretrained``. Attributes:
    graphdef: the model's structure (eval mode).
    state: its weights (and dropout RNG state), frozen.
    normalization: the input normalisation the weights expect.
    mean_rgb: its 0-255 mean for ``'mean_rgb'``, else None.
    content_layers: ``((layer, weight), ...)`` of the feature loss.
    style_layers: ``((layer, weight), ...)`` of the style loss.
    distance: ``'l2'`` or ``'l1'``, for the feature loss.
  """
  graphdef: Any = struct.field(pytree_node=False)
  state: Any
  normalization: str = struct.field(pytree_node=False)
  mean_rgb: tuple[float, ...] | None = struct.field(pytree_node=False)
  content_layers: tuple[tuple[str, float], ...] = struct.field(
      pytree_node=False)
  style_layers: tuple[tuple[str, float], ...] = struct.field(pytree_node=False)
  distance: str = struct.field(pytree_node=False)

  @classmethod
  def from_model(cls, model: models.VGG, *, normalization: str,
                 mean_rgb=None, content_layers: LayerWeights = JOHNSON_LAYERS,
                 style_layers: LayerWeights = GATYS_LAYERS,
                 distance: str = 'l2') -> 'PerceptualLoss':
    """Losses on any VGG model (left unchanged; its weights are shared).

    Args:
      model: a ``VGG``; used in eval mode (no dropout, BN running stats).
      normalization: one of ``preprocessing.NORMALIZATIONS``: the input the
        weights expect.
      mean_rgb: the 0-255 RGB mean for ``'mean_rgb'`` (None: ImageNet's).
      content_layers: layer names, or ``{name: weight}``, of the feature
        reconstruction loss; ``()`` for none.
      style_layers: the same for the style loss.
      distance: ``'l2'`` (squared error, Johnson et al.) or ``'l1'``.

    Raises:
      ValueError: a layer the net lacks (naming the valid ones), or a bad
        normalisation or distance.
    """
    preprocessing.normalizer(normalization)  # checks the name
    if distance not in DISTANCES:
      raise ValueError(f'Unknown distance {distance!r}; valid: '
                       f'{", ".join(DISTANCES)}.')
    if normalization == 'mean_rgb':
      mean_rgb = tuple(float(v) for v in (
          preprocessing.IMAGENET_MEAN_RGB if mean_rgb is None else mean_rgb))
    else:
      mean_rgb = None
    # A copy of the graph in eval mode; the arrays are shared, not copied.
    eval_model = nnx.merge(*nnx.split(model))
    eval_model.eval()
    graphdef, state = nnx.split(eval_model)
    return cls(graphdef=graphdef, state=state, normalization=normalization,
               mean_rgb=mean_rgb,
               content_layers=_weighted(model.name, content_layers, 'content'),
               style_layers=_weighted(model.name, style_layers, 'style'),
               distance=distance)

  @classmethod
  def from_pretrained(cls, directory, *,
                      content_layers: LayerWeights = JOHNSON_LAYERS,
                      style_layers: LayerWeights = GATYS_LAYERS,
                      distance: str = 'l2',
                      **model_overrides) -> 'PerceptualLoss':
    """Losses on the net of a pretrained dir, with its normalisation.

    Args:
      directory: a pretrained dir (``vgg_jax.pretrained``); trunk-only dirs
        serve any conv layer.
      content_layers: as ``from_model``.
      style_layers: as ``from_model``.
      distance: as ``from_model``.
      **model_overrides: ``load_pretrained`` overrides, e.g.
        ``dtype='bfloat16'``.
    """
    model, meta = pretrained.load_pretrained(directory, **model_overrides)
    return cls.from_model(model, normalization=meta['normalization'],
                          mean_rgb=meta['mean_rgb'],
                          content_layers=content_layers,
                          style_layers=style_layers, distance=distance)

  def features(self, images: jax.Array,
               layers: Iterable[str] | None = None) -> dict[str, jax.Array]:
    """Activations of images in [0, 1] (default: the content layers).

    Args:
      images: float ``(N, H, W, 3)`` RGB in [0, 1].
      layers: layer names; None: ``content_layers``.
    """
    return _features(self, images, tuple(
        k for k, _ in self.content_layers) if layers is None else tuple(
            [layers] if isinstance(layers, str) else layers))

  def grams(self, images: jax.Array) -> dict[str, jax.Array]:
    """Gram matrices ``(N, C, C)`` of the style layers, to reuse as targets."""
    return _grams(self, images)

  def content_loss(self, images: jax.Array, targets: Target, *,
                   reduction: str = 'mean') -> jax.Array:
    """Feature reconstruction loss between ``images`` and ``targets``.

    Args:
      images: float ``(N, H, W, 3)`` RGB in [0, 1].
      targets: images of the same shape (or broadcastable batch), or their
        ``features``.
      reduction: ``'mean'`` or ``'sum'`` over the batch, or ``'none'``.
    """
    return self(images, content_targets=targets, reduction=reduction)

  def style_loss(self, images: jax.Array, style: Target, *,
                 reduction: str = 'mean') -> jax.Array:
    """Style loss between ``images`` and style images (or their ``grams``).

    Args:
      images: float ``(N, H, W, 3)`` RGB in [0, 1].
      style: images of any size, batch 1 or N, or their ``grams``.
      reduction: ``'mean'`` or ``'sum'`` over the batch, or ``'none'``.
    """
    return self(images, style_targets=style, reduction=reduction)

  def __call__(self, images: jax.Array, content_targets: Target | None = None,
               style_targets: Target | None = None, *,
               reduction: str = 'mean') -> jax.Array:
    """Content loss plus style loss, from one forward pass of ``images``.

    Args:
      images: float ``(N, H, W, 3)`` RGB in [0, 1].
      content_targets: as ``content_loss``'s ``targets``, or None for no
        content term.
      style_targets: as ``style_loss``'s ``style``, or None for no style term.
      reduction: ``'mean'`` or ``'sum'`` over the batch, or ``'none'``.

    Raises:
      ValueError: bad reduction or images, no term asked for, or a term
        whose layer list is empty.
    """
    if reduction not in REDUCTIONS:
      raise ValueError(f'Unknown reduction {reduction!r}; valid: '
                       f'{", ".join(REDUCTIONS)}.')
    if content_targets is None and style_targets is None:
      raise ValueError('Give content targets, style targets or both.')
    for given, pairs, what in ((content_targets, self.content_layers,
                                'content'),
                               (style_targets, self.style_layers, 'style')):
      if given is not None and not pairs:
        raise ValueError(f'This loss has no {what} layers.')
    return _reduce(_total(self, images, content_targets, style_targets),
                   reduction)


def _check_images(images: jax.Array):
  if not jnp.issubdtype(images.dtype, jnp.floating) or images.ndim != 4:
    raise ValueError(f'Expected float (N, H, W, C) images in [0, 1], got '
                     f'{images.dtype} {images.shape}.')


@functools.partial(jax.jit, static_argnums=2)
def _features(loss: PerceptualLoss, images: jax.Array,
              layers: tuple[str, ...]) -> dict[str, jax.Array]:
  _check_images(images)
  x = preprocessing.normalize(images * 255.0, loss.normalization,
                              loss.mean_rgb or preprocessing.IMAGENET_MEAN_RGB)
  model = nnx.merge(loss.graphdef, jax.tree.map(_frozen, loss.state))
  return model.features(x, layers)


@jax.jit
def _grams(loss: PerceptualLoss, images: jax.Array) -> dict[str, jax.Array]:
  feats = _features(loss, images, tuple(k for k, _ in loss.style_layers))
  return {k: gram_matrix(v) for k, v in feats.items()}


@jax.jit
def _total(loss: PerceptualLoss, images: jax.Array,
           content_targets: Target | None,
           style_targets: Target | None) -> jax.Array:
  """Per-example weighted content plus style loss, ``(N,)`` float32."""
  wanted = []
  if content_targets is not None:
    wanted += [k for k, _ in loss.content_layers]
    if not isinstance(content_targets, Mapping):
      content_targets = _features(loss, content_targets,
                                  tuple(k for k, _ in loss.content_layers))
  if style_targets is not None:
    wanted += [k for k, _ in loss.style_layers]
    if not isinstance(style_targets, Mapping):
      style_targets = _grams(loss, style_targets)
  feats = _features(loss, images, tuple(dict.fromkeys(wanted)))
  total = jnp.zeros(images.shape[:1], jnp.float32)
  if content_targets is not None:
    for layer, weight in loss.content_layers:
      diff = (feats[layer].astype(jnp.float32) -
              jnp.asarray(content_targets[layer], jnp.float32))
      err = diff * diff if loss.distance == 'l2' else jnp.abs(diff)
      total += weight * err.mean(axis=(1, 2, 3))
  if style_targets is not None:
    for layer, weight in loss.style_layers:
      diff = gram_matrix(feats[layer]) - style_targets[layer]
      total += weight * (diff * diff).sum(axis=(1, 2))
  return total
