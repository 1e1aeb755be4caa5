"""The six VGG networks of Simonyan & Zisserman (ICLR 2015) in Flax NNX.

Every net is a stack of five conv blocks (3x3 convs, stride 1, SAME padding,
ReLU, 2x2/2 max-pool) followed by a head that is convolutional from the start:
FC-6 is a ``k x k`` VALID conv, FC-7 and FC-8 are 1x1 convs. On a training-size
crop the score map is 1x1 and the model returns ``(N, num_classes)`` logits; on
a larger image the same weights scan the whole image (the paper's dense
evaluation, Sec. 3.2) and the model returns the spatially averaged class scores.

Every activation has a name (``conv1_1``, ``relu1_1``, ``pool1``, ...,
``fc6``, ``relu6``, ..., ``fc8``; ``bn1_1`` ... on ``_bn`` nets):
``layer_names(name)`` lists a net's, ``layer_table(name)`` adds torchvision's
and Keras' names for them (``vgg_jax.layers``), and ``features(x, layers)``
computes the requested ones, running the net only as far as it must.

Parameter layout (used by checkpoint conversion and init-from-net-A)::

    blocks[b].convs[i].{kernel,bias}      b = 0..4, i = 0..len(block)-1
    blocks[b].norms[i].{scale,bias,mean,var}   (``_bn`` variants only)
    fc6.{kernel,bias}, fc7.{kernel,bias}, fc8.{kernel,bias}

Example::

    model = create_model('vgg16', num_classes=1000, rngs=nnx.Rngs(0))
    model.eval()                                   # no dropout, BN running stats
    logits = model(images)                         # (N, 1000)
    scores = model.score_map(images)               # (N, h, w, 1000)
    feats = model.features(images)                 # {'pool1': ..., 'relu7': ...}
    named = model.features(images, ['relu2_2', 'pool5'])  # see vgg_jax.layers
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vgg_jax import ops
# The table and options live in architectures; re-exported as the public API.
from vgg_jax.architectures import ARCHITECTURE_FIELDS  # pylint: disable=unused-import
from vgg_jax.architectures import ARCHITECTURES  # pylint: disable=unused-import
from vgg_jax.architectures import Architecture  # pylint: disable=unused-import
from vgg_jax.architectures import count_macs  # pylint: disable=unused-import
from vgg_jax.architectures import FC_WIDTH
from vgg_jax.architectures import INIT_SCHEMES
from vgg_jax.architectures import layer_spec  # pylint: disable=unused-import
from vgg_jax.architectures import MODEL_NAMES  # pylint: disable=unused-import
from vgg_jax.architectures import MODEL_OPTIONS  # pylint: disable=unused-import
from vgg_jax.architectures import ModelOptions
from vgg_jax.architectures import parse_name
from vgg_jax.layers import check_layers
from vgg_jax.layers import conv_name
from vgg_jax.layers import HEAD_ACTIVATIONS
from vgg_jax.layers import layer_names  # pylint: disable=unused-import
from vgg_jax.layers import layer_table
from vgg_jax.layers import layer_table_markdown  # pylint: disable=unused-import
from vgg_jax.layers import LRN_NAME
from vgg_jax.layers import pool_name


def local_response_norm(x: jax.Array, *, n: int = 5, k: float = 2.0,
                        alpha: float = 1e-4, beta: float = 0.75) -> jax.Array:
  """AlexNet's local response normalisation across channels (NHWC).

  ``b_c = a_c / (k + alpha * sum_{|j-c| <= n//2} a_j^2) ** beta``. Note that
  alpha is *not* divided by n (PyTorch's LocalResponseNorm divides it).

  Args:
    x: activations, channels last.
    n: number of neighbouring channels summed (odd).
    k: additive constant.
    alpha: scale of the sum.
    beta: exponent.

  Returns:
    Normalised activations with the dtype of ``x``.
  """
  xf = x.astype(jnp.float32)
  half = n // 2
  sq_sum = jax.lax.reduce_window(
      xf * xf, 0.0, jax.lax.add, (1,) * (x.ndim - 1) + (n,),
      (1,) * x.ndim, [(0, 0)] * (x.ndim - 1) + [(half, half)])
  return (xf / (k + alpha * sq_sum) ** beta).astype(x.dtype)


def initializer(scheme: str):
  """The kernel initialiser of an ``INIT_SCHEMES`` name."""
  if scheme == 'normal':  # the paper: zero-mean normal, std 0.01 (docs/paper.md §2)
    return nnx.initializers.normal(stddev=0.01)
  if scheme == 'glorot':
    return nnx.initializers.glorot_uniform()
  if scheme == 'he':
    return nnx.initializers.variance_scaling(2.0, 'fan_in', 'normal')
  raise ValueError(f'Unknown init scheme {scheme!r}; valid: '
                   f'{", ".join(INIT_SCHEMES)}.')


class ConvBlock(nnx.Module):
  """Convs (each optionally followed by BN) with ReLU, then a 2x2/2 max-pool."""

  def __init__(self, in_features: int, layers: Sequence[tuple[int, int]], *,
               batch_norm: bool, lrn: bool, dtype, param_dtype, kernel_init,
               rngs: nnx.Rngs):
    convs, norms = [], []
    for width, k in layers:
      convs.append(nnx.Conv(
          in_features, width, (k, k), padding='SAME', dtype=dtype,
          param_dtype=param_dtype, kernel_init=kernel_init,
          bias_init=nnx.initializers.zeros_init(),
          conv_general_dilated=ops.conv_general_dilated, rngs=rngs))
      if batch_norm:
        # momentum 0.9 here is PyTorch's 0.1; eps as torchvision.
        norms.append(nnx.BatchNorm(width, momentum=0.9, epsilon=1e-5,
                                   dtype=dtype, param_dtype=param_dtype,
                                   rngs=rngs))
      in_features = width
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms) if batch_norm else None
    self.lrn = lrn

  def activations(self, x: jax.Array, valid: jax.Array | None, block: int
                  ) -> Iterator[tuple[str, jax.Array]]:
    """Yields ``(layer name, activation)`` in forward order, computing lazily.

    Args:
      x: the block's input.
      valid: optional ``(N, H, W, 1)`` 0/1 mask of the image on a larger
        canvas; activations are zeroed outside it before each conv (the
        yielded ones are not, see ``VGG.features``).
      block: the block's index (0-based), for the names.
    """
    if valid is not None:
      # A pool over an odd valid size leaves a non-zero border row.
      x = x * valid
    for i, conv in enumerate(self.convs):
      x = conv(x)
      yield conv_name('conv', block, i), x
      if self.norms is not None:
        x = self.norms[i](x)
        yield conv_name('bn', block, i), x
      x = nnx.relu(x)
      yield conv_name('relu', block, i), x
      if self.lrn and i == 0:
        x = local_response_norm(x)
        yield LRN_NAME, x
      if valid is not None:
        # Zero outside the image so the next conv sees exactly the zero
        # padding it would see on the unpadded image.
        x = x * valid
    yield pool_name(block), ops.max_pool_2x2(x)


class VGG(nnx.Module):
  """A VGG network with a convolutionalised head.

  Use ``model.train()`` / ``model.eval()`` to switch dropout and batch norm.
  """

  def __init__(self, name: str = 'vgg16', *, rngs: nnx.Rngs, **options):
    """Builds the network.

    Args:
      name: one of ``MODEL_NAMES``.
      rngs: random streams; ``params`` initialises, ``dropout`` drives dropout.
      **options: fields of ``ModelOptions`` (defaults there): ``num_classes``,
        ``dropout_rate``, ``width_multiplier``, ``fc6_kernel``, ``init``,
        ``dtype``, ``param_dtype``, ``in_channels``.
    """
    arch, batch_norm = parse_name(name)
    opts = ModelOptions.create(**options)
    dtype, param_dtype = jnp.dtype(opts.dtype), jnp.dtype(opts.param_dtype)
    kernel_init = initializer(opts.init)
    num_classes, in_channels = opts.num_classes, opts.in_channels
    self.name = name
    self.architecture = arch
    self.batch_norm = batch_norm
    self.num_classes = num_classes

    scaled = opts.scaled

    blocks, c = [], in_channels
    for b, layers in enumerate(arch.blocks):
      layers = tuple((scaled(w), k) for w, k in layers)
      blocks.append(ConvBlock(
          c, layers, batch_norm=batch_norm, lrn=arch.lrn and b == 0,
          dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init,
          rngs=rngs))
      c = layers[-1][0]
    self.blocks = nnx.List(blocks)
    fc = scaled(FC_WIDTH)
    conv = lambda i, o, k: nnx.Conv(  # pylint: disable=g-long-lambda
        i, o, (k, k), padding='VALID', dtype=dtype, param_dtype=param_dtype,
        kernel_init=kernel_init, bias_init=nnx.initializers.zeros_init(),
        conv_general_dilated=ops.conv_general_dilated, rngs=rngs)
    self.fc6 = conv(c, fc, opts.fc6_kernel)
    self.fc7 = conv(fc, fc, 1)
    self.fc8 = conv(fc, num_classes, 1)
    self.dropout = nnx.Dropout(opts.dropout_rate, rngs=rngs)
    self.dtype = dtype

  def features(self, x: jax.Array, layers: str | Iterable[str] | None = None,
               *, valid_size: jax.Array | None = None,
               rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
    """Named activations; without ``layers``, each block's and the head's.

    Args:
      x: images ``(N, H, W, C)``, already normalised.
      layers: layer names (``layer_names(model.name)``: ``conv1_1``,
        ``relu1_1``, ``pool1``, ..., ``fc6``, ``relu6``, ..., ``fc8``; see
        ``vgg_jax.layers``), or one name. The net is run only as far as the
        deepest of them, so trunk layers take images of any size and
        ``relu2_2`` costs four convs. None: the summary described below.
      valid_size: optional ``(N, 2)`` int ``(height, width)`` of each image
        placed at the top-left of a larger zero canvas ``x``. Activations are
        then zeroed outside the image after every layer, so every output
        inside the image equals that of the image run on its own: one
        compiled program serves images of many sizes (dense evaluation).
        Named layers come back zero outside the image too (for the head:
        where FC-6's window is not inside it).
      rngs: optional dropout streams for training mode.

    Returns:
      With ``layers``: exactly the requested activations by name, in the
      compute dtype, ``(N, h, w, channels)`` each. Without: ``pool1`` ..
      ``pool5``: each block's pooled output (not masked); ``relu6`` and
      ``relu7``: the head's post-ReLU activations (before dropout) as maps
      ``(N, h, w, 4096)``, which are 1x1 on a training-size crop
      (``relu7[:, 0, 0]`` is the classic 4096-d VGG feature); the same
      names as with ``layers``; ``scores``: the class score map ``(N, h,
      w, num_classes)`` in float32; with ``valid_size`` also ``score_mask``
      ``(N, h, w)``, True where FC-6's window lies inside the image
      (``scores`` is zero elsewhere).

    Raises:
      ValueError: a layer the net lacks (the message lists the valid ones),
        or an image too small for FC-6 when a head layer is needed.
    """
    x = jnp.asarray(x, self.dtype)
    steps = self._activations(x, valid_size, rngs)
    if layers is None:
      self._check_fits_head(x.shape)
      return self._summary(steps, valid_size)
    wanted = check_layers(self.name, [layers] if isinstance(layers, str)
                          else layers)
    if not wanted:
      return {}
    if set(wanted) & set(HEAD_ACTIVATIONS):
      self._check_fits_head(x.shape)
    got = {}
    for name, value in steps:
      if name in wanted:
        if valid_size is not None:
          value = value * self.layer_mask(name, valid_size, value.shape[1:3]
                                           )[..., None].astype(value.dtype)
        got[name] = value
        if len(got) == len(set(wanted)):
          break  # the generator computes nothing further
    return {name: got[name] for name in wanted}

  def _check_fits_head(self, shape: Sequence[int]):
    """Raises ValueError unless FC-6's window fits an ``(N, H, W, C)`` input."""
    k = self.fc6.kernel_size
    if shape[1] < 32 * k[0] or shape[2] < 32 * k[1]:
      raise ValueError(
          f'Input {shape[1]}x{shape[2]} is too small: FC-6 is a '
          f'{k[0]}x{k[1]} conv over the 1/32 map, so images must be at least '
          f'{32 * k[0]}x{32 * k[1]}.')

  def _activations(self, x: jax.Array, valid_size: jax.Array | None,
                   rngs: nnx.Rngs | None) -> Iterator[tuple[str, jax.Array]]:
    """Yields ``(layer name, activation)`` in forward order, lazily."""
    for b, block in enumerate(self.blocks):
      valid = None
      if valid_size is not None:
        valid = valid_mask(valid_size, x.shape[1:3], 2 ** b)[..., None]
        valid = valid.astype(x.dtype)
      for name, x in block.activations(x, valid, b):
        yield name, x
    x = self.fc6(x)
    yield 'fc6', x
    x = nnx.relu(x)
    yield 'relu6', x
    x = self.fc7(self.dropout(x, rngs=rngs))
    yield 'fc7', x
    x = nnx.relu(x)
    yield 'relu7', x
    yield 'fc8', self.fc8(self.dropout(x, rngs=rngs))

  def _summary(self, steps: Iterator[tuple[str, jax.Array]],
               valid_size: jax.Array | None) -> dict[str, jax.Array]:
    """``features``' dict without ``layers``: pools, relu6, relu7, scores."""
    out = {}
    for name, value in steps:
      if name.startswith('pool') or name in ('relu6', 'relu7'):
        out[name] = value
      elif name == 'fc8':
        scores = value.astype(jnp.float32)
    if valid_size is not None:
      score_mask = self.layer_mask('fc8', valid_size, scores.shape[1:3])
      out['score_mask'] = score_mask
      scores = scores * score_mask[..., None]
    out['scores'] = scores
    return out

  def layer_mask(self, layer: str, valid_size: jax.Array,
                 shape: Sequence[int]) -> jax.Array:
    """Where a layer's ``(h, w)`` map lies inside each image, ``(N, h, w)``.

    The positions ``features`` keeps with ``valid_size`` (it zeroes the rest).

    Args:
      layer: one of ``layer_names(self.name)``.
      valid_size: ``(N, 2)`` int image sizes on the canvas.
      shape: ``(h, w)`` of the layer's map.
    """
    if layer in HEAD_ACTIVATIONS:
      # A head position is valid when FC-6's window lies inside the image.
      valid_hw = jnp.asarray(valid_size) // 32 - jnp.asarray(
          self.fc6.kernel_size) + 1
      return valid_mask(valid_hw, shape, 1)
    stride = {row['layer']: row['stride'] for row in layer_table(self.name)}
    return valid_mask(valid_size, shape, stride[layer])

  def score_map(self, x: jax.Array, *, valid_size: jax.Array | None = None,
                rngs: nnx.Rngs | None = None) -> jax.Array:
    """The class score map ``(N, h, w, num_classes)``, float32.

    Args:
      x: images ``(N, H, W, C)``; ``h = floor(H/32) - fc6_kernel + 1``.
      valid_size: optional image sizes on a zero canvas (see ``features``);
        scores outside the image are zero.
      rngs: optional dropout streams for training mode.
    """
    return self.features(x, valid_size=valid_size, rngs=rngs)['scores']

  def __call__(self, x: jax.Array, *, valid_size: jax.Array | None = None,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """Class scores ``(N, num_classes)``: the score map averaged spatially.

    Args:
      x: images ``(N, H, W, C)``, already normalised.
      valid_size: optional image sizes on a zero canvas (see ``features``):
        the average is then over the image's own score positions only.
      rngs: optional dropout streams for training mode.
    """
    out = self.features(x, valid_size=valid_size, rngs=rngs)
    if valid_size is None:
      return out['scores'].mean(axis=(1, 2))
    count = out['score_mask'].sum(axis=(1, 2)).astype(jnp.float32)
    return out['scores'].sum(axis=(1, 2)) / jnp.maximum(count, 1.0)[:, None]


def valid_mask(valid_size: jax.Array, shape: Sequence[int], stride: int
               ) -> jax.Array:
  """Boolean ``(N, h, w)`` mask of the top-left ``valid_size // stride`` region.

  Args:
    valid_size: ``(N, 2)`` int ``(height, width)`` at full resolution.
    shape: ``(h, w)`` of the map.
    stride: how many input pixels one map position covers.
  """
  valid_size = jnp.asarray(valid_size) // stride
  rows = jnp.arange(shape[0])[None, :] < valid_size[:, :1]
  cols = jnp.arange(shape[1])[None, :] < valid_size[:, 1:2]
  return rows[:, :, None] & cols[:, None, :]


def create_model(name: str, *, rngs: nnx.Rngs | int = 0, **options) -> VGG:
  """Builds a VGG net by name.

  Args:
    name: one of ``MODEL_NAMES``: ``vgg11`` (A), ``vgg11_lrn`` (A-LRN),
      ``vgg13`` (B), ``vgg16_c`` (C), ``vgg16`` (D), ``vgg19`` (E), each also
      with ``_bn``.
    rngs: an ``nnx.Rngs`` or an integer seed.
    **options: any of ``MODEL_OPTIONS`` (see ``VGG.__init__``).

  Returns:
    The model, in training mode.

  Raises:
    ValueError: unknown name, unknown option or bad option value.
  """
  parse_name(name)
  options = ModelOptions.create(**options).as_dict()
  if isinstance(rngs, int):
    rngs = nnx.Rngs(params=rngs, dropout=rngs + 1)
  # One compiled initialiser instead of one dispatch per parameter (tens of
  # seconds on a CPU). XLA:CPU spends seconds optimising its unrolled
  # Threefry code, which only pays off for big nets (see
  # `init_compiler_options`). Under a transformation (eval_shape, jit) the
  # initialiser is part of the outer program, whose options apply.
  rngs_def, rngs_state = nnx.split(rngs)
  init = _Initializer(name, options, rngs_def)
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(rngs_state)):
    model_state, rngs_state = jax.jit(init)(rngs_state)
  else:
    lowered = jax.jit(init).lower(rngs_state)
    size = sum(math.prod(x.shape)
               for x in jax.tree.leaves(lowered.out_info[0]))
    model_state, rngs_state = lowered.compile(
        compiler_options=init_compiler_options(size))(rngs_state)
  nnx.update(rngs, rngs_state)
  return nnx.merge(init.model_def, model_state)


def init_compiler_options(num_values: int) -> dict[str, int] | None:
  """``jax.jit`` compiler options for a one-off initialiser of random values.

  On a CPU, compiling the initialiser without LLVM optimisation saves ~4 s
  of compilation and costs ~0.05 s per million values drawn (measured on a
  2-core AMD EPYC: the quickstart net 4.6 s -> 1.1 s, full VGG-16 4.8 s ->
  8.3 s), so it is used below 50M values. The draws are the same; normal
  samples may differ from an optimised build's in the last bit. Elsewhere:
  the defaults.

  Args:
    num_values: how many values the initialiser draws.
  """
  if jax.default_backend() == 'cpu' and num_values < 50_000_000:
    return {'xla_backend_optimization_level': 0}
  return None


class _Initializer:
  """``VGG(name, ...)`` as a pure function of the RNG state, for ``jax.jit``.

  Tracing records the model's graph definition (static) in ``model_def``.
  """

  def __init__(self, name: str, options: dict, rngs_def: nnx.GraphDef):
    self.name, self.options, self.rngs_def = name, options, rngs_def
    self.model_def = None

  def __call__(self, rngs_state: nnx.State) -> tuple[nnx.State, nnx.State]:
    rngs = nnx.merge(self.rngs_def, rngs_state)
    self.model_def, model_state = nnx.split(
        VGG(self.name, rngs=rngs, **self.options))
    return model_state, nnx.state(rngs)


def count_params(model: nnx.Module) -> int:
  """Number of trainable parameters (``nnx.Param``), excluding BN statistics."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      nnx.state(model, nnx.Param)))


def abstract_model(name: str, **options) -> VGG:
  """The model with shapes only (no memory, no compute): for counting."""
  return nnx.eval_shape(lambda: create_model(name, **options))
