"""The six VGG networks of Simonyan & Zisserman (ICLR 2015) in Flax NNX.

Every net is a stack of five conv blocks (3x3 convs, stride 1, SAME padding,
ReLU, 2x2/2 max-pool) followed by a head that is convolutional from the start:
FC-6 is a ``k x k`` VALID conv, FC-7 and FC-8 are 1x1 convs. On a training-size
crop the score map is 1x1 and the model returns ``(N, num_classes)`` logits; on
a larger image the same weights scan the whole image (the paper's dense
evaluation, Sec. 3.2) and the model returns the spatially averaged class scores.

Parameter layout (used by checkpoint conversion and init-from-net-A)::

    blocks[b].convs[i].{kernel,bias}      b = 0..4, i = 0..len(block)-1
    blocks[b].norms[i].{scale,bias,mean,var}   (``_bn`` variants only)
    fc6.{kernel,bias}, fc7.{kernel,bias}, fc8.{kernel,bias}

Example::

    model = create_model('vgg16', num_classes=1000, rngs=nnx.Rngs(0))
    model.eval()                                   # no dropout, BN running stats
    logits = model(images)                         # (N, 1000)
    scores = model.score_map(images)               # (N, h, w, 1000)
    feats = model.features(images)                 # {'block1': ..., 'fc7': ...}
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# A conv layer is (output width, kernel size); 'L' marks the LRN layer.
_A = (((64, 3),), ((128, 3),), ((256, 3),) * 2, ((512, 3),) * 2, ((512, 3),) * 2)
_B = (((64, 3),) * 2, ((128, 3),) * 2, ((256, 3),) * 2, ((512, 3),) * 2,
      ((512, 3),) * 2)
_C = (((64, 3),) * 2, ((128, 3),) * 2, ((256, 3),) * 2 + ((256, 1),),
      ((512, 3),) * 2 + ((512, 1),), ((512, 3),) * 2 + ((512, 1),))
_D = (((64, 3),) * 2, ((128, 3),) * 2, ((256, 3),) * 3, ((512, 3),) * 3,
      ((512, 3),) * 3)
_E = (((64, 3),) * 2, ((128, 3),) * 2, ((256, 3),) * 4, ((512, 3),) * 4,
      ((512, 3),) * 4)


@dataclasses.dataclass(frozen=True)
class Architecture:
  """A row of Table 1 of the paper.

  Attributes:
    config: the paper's letter (A, A-LRN, B, C, D, E).
    blocks: per block, the (width, kernel size) of each conv.
    lrn: whether LRN follows the first conv's ReLU (A-LRN only).
  """
  config: str
  blocks: tuple[tuple[tuple[int, int], ...], ...]
  lrn: bool = False


ARCHITECTURES: Mapping[str, Architecture] = {
    'vgg11': Architecture('A', _A),
    'vgg11_lrn': Architecture('A-LRN', _A, lrn=True),
    'vgg13': Architecture('B', _B),
    'vgg16_c': Architecture('C', _C),
    'vgg16': Architecture('D', _D),
    'vgg19': Architecture('E', _E),
}

MODEL_NAMES: tuple[str, ...] = tuple(
    n for base in ARCHITECTURES for n in (base, base + '_bn'))

INIT_SCHEMES = ('normal', 'glorot', 'he')
FC_WIDTH = 4096


@dataclasses.dataclass(frozen=True)
class ModelOptions:
  """Every ``create_model`` option with its default: the one source of both.

  Configs (``config.model``), checkpoint metadata and pretrained dirs record
  these fields next to the model name; ``ARCHITECTURE_FIELDS`` are the ones
  that change parameter shapes.

  Attributes:
    num_classes: width of FC-8.
    dropout_rate: dropout after FC-6 and FC-7 (paper: 0.5).
    width_multiplier: scales every conv width and the FC-6/FC-7 width (1.0 is
      the paper; e.g. 0.125 for laptop experiments).
    fc6_kernel: FC-6 kernel size: 7 for 224 crops (224 / 32), 1 for 32 crops.
    init: kernel initialisation, one of ``INIT_SCHEMES``; biases are zero.
    dtype: compute dtype (e.g. ``'bfloat16'``).
    param_dtype: storage dtype of the parameters.
    in_channels: input channels (3 for RGB).
  """
  num_classes: int = 1000
  dropout_rate: float = 0.5
  width_multiplier: float = 1.0
  fc6_kernel: int = 7
  init: str = 'normal'
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  in_channels: int = 3

  def __post_init__(self):
    for field in ('num_classes', 'fc6_kernel', 'in_channels'):
      v = getattr(self, field)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f'Bad {field} {v!r}: must be a positive integer.')
    if not 0.0 <= float(self.dropout_rate) < 1.0:
      raise ValueError(f'Bad dropout_rate {self.dropout_rate!r}: must be in '
                       '[0, 1).')
    if not float(self.width_multiplier) > 0:
      raise ValueError(f'Bad width_multiplier {self.width_multiplier!r}: '
                       'must be > 0.')
    if self.init not in INIT_SCHEMES:
      raise ValueError(f'Unknown init scheme {self.init!r}; valid: '
                       f'{", ".join(INIT_SCHEMES)}.')
    for field in ('dtype', 'param_dtype'):
      try:
        # Stored as the canonical name so metadata compares equal.
        object.__setattr__(self, field, str(jnp.dtype(getattr(self, field))))
      except TypeError:
        raise ValueError(f'Bad {field} {getattr(self, field)!r}: not a dtype '
                         '(e.g. "float32", "bfloat16").') from None

  @classmethod
  def create(cls, **options) -> 'ModelOptions':
    """Options from keywords; unknown names are a ValueError listing valid ones."""
    unknown = sorted(set(options) - set(MODEL_OPTIONS))
    if unknown:
      raise ValueError(f'Unknown model option(s) {", ".join(unknown)}; valid '
                       f'options: {", ".join(MODEL_OPTIONS)}.')
    return cls(**options)

  @classmethod
  def from_config(cls, model_config: Mapping[str, Any]) -> 'ModelOptions':
    """The options of a ``config.model`` section (or metadata ``model`` entry).

    Fields it lacks take their defaults; ``name`` and fields that are not
    model options are ignored.
    """
    return cls(**{k: v for k, v in dict(model_config).items()
                  if k in MODEL_OPTIONS})

  def as_dict(self) -> dict[str, Any]:
    """``create_model`` keyword arguments."""
    return dataclasses.asdict(self)

  def scaled(self, width: int) -> int:
    """A paper width scaled by ``width_multiplier`` (at least 1)."""
    return max(1, int(round(width * self.width_multiplier)))


MODEL_OPTIONS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(ModelOptions))
# Options that change the parameter shapes: a checkpoint only loads into a
# model that agrees on all of them (and on the name).
ARCHITECTURE_FIELDS = ('num_classes', 'width_multiplier', 'fc6_kernel',
                       'in_channels')


def parse_name(name: str) -> tuple[Architecture, bool]:
  """Splits a model name into its architecture and whether it uses batch norm.

  Args:
    name: one of ``MODEL_NAMES``.

  Returns:
    ``(architecture, batch_norm)``.

  Raises:
    ValueError: for an unknown name; the message lists the valid ones.
  """
  if name not in MODEL_NAMES:
    close = difflib.get_close_matches(str(name), MODEL_NAMES, n=1)
    hint = f' Did you mean {close[0]!r}?' if close else ''
    raise ValueError(f'Unknown model name {name!r}.{hint} Valid names: '
                     f'{", ".join(MODEL_NAMES)}.')
  batch_norm = name.endswith('_bn')
  return ARCHITECTURES[name[:-3] if batch_norm else name], batch_norm


def layer_spec(name: str) -> list[str]:
  """The model's layers as Table 1 of the paper writes them.

  Args:
    name: one of ``MODEL_NAMES``.

  Returns:
    Strings such as ``'conv3-64'``, ``'LRN'``, ``'maxpool'``, ``'FC-4096'``,
    ``'FC-1000'``, ``'soft-max'`` in forward order (full widths, 1000 classes).
  """
  arch, batch_norm = parse_name(name)
  out = []
  for b, block in enumerate(arch.blocks):
    for i, (width, k) in enumerate(block):
      out.append(f'conv{k}-{width}')
      if batch_norm:
        out.append('BN')
      if arch.lrn and b == 0 and i == 0:
        out.append('LRN')
    out.append('maxpool')
  return out + ['FC-4096', 'FC-4096', 'FC-1000', 'soft-max']


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
  if scheme == 'normal':  # the paper: zero-mean normal, std 0.01 (PAPER.md §2)
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
          bias_init=nnx.initializers.zeros_init(), rngs=rngs))
      if batch_norm:
        # momentum 0.9 here is PyTorch's 0.1; eps as torchvision.
        norms.append(nnx.BatchNorm(width, momentum=0.9, epsilon=1e-5,
                                   dtype=dtype, param_dtype=param_dtype,
                                   rngs=rngs))
      in_features = width
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms) if batch_norm else None
    self.lrn = lrn

  def __call__(self, x: jax.Array, valid: jax.Array | None = None
               ) -> jax.Array:
    if valid is not None:
      # A pool over an odd valid size leaves a non-zero border row.
      x = x * valid
    for i, conv in enumerate(self.convs):
      x = conv(x)
      if self.norms is not None:
        x = self.norms[i](x)
      x = nnx.relu(x)
      if self.lrn and i == 0:
        x = local_response_norm(x)
      if valid is not None:
        # Zero outside the image so the next conv sees exactly the zero
        # padding it would see on the unpadded image.
        x = x * valid
    return nnx.max_pool(x, (2, 2), strides=(2, 2))


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
        rngs=rngs)
    self.fc6 = conv(c, fc, opts.fc6_kernel)
    self.fc7 = conv(fc, fc, 1)
    self.fc8 = conv(fc, num_classes, 1)
    self.dropout = nnx.Dropout(opts.dropout_rate, rngs=rngs)
    self.dtype = dtype

  def features(self, x: jax.Array, *, valid_size: jax.Array | None = None,
               rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
    """Every block's output and the head's activations.

    Args:
      x: images ``(N, H, W, C)``, already normalised.
      valid_size: optional ``(N, 2)`` int ``(height, width)`` of each image
        placed at the top-left of a larger zero canvas ``x``. Activations are
        then zeroed outside the image after every layer, so every output
        inside the image equals that of the image run on its own: one
        compiled program serves images of many sizes (dense evaluation).
      rngs: optional dropout streams for training mode.

    Returns:
      ``block1``..``block5``: each block's pooled output ``(N, H/2^b, W/2^b,
      width)``; ``fc6`` and ``fc7``: the head's post-ReLU activations (before
      dropout) as maps ``(N, h, w, 4096)``, which are 1x1 on a training-size
      crop (``fc7[:, 0, 0]`` is the classic 4096-d VGG feature); ``scores``:
      the class score map ``(N, h, w, num_classes)`` in float32; with
      ``valid_size`` also ``score_mask`` ``(N, h, w)``, True where FC-6's
      window lies inside the image (``scores`` is zero elsewhere).
    """
    out = {}
    x = jnp.asarray(x, self.dtype)
    k = self.fc6.kernel_size
    if x.shape[1] < 32 * k[0] or x.shape[2] < 32 * k[1]:
      raise ValueError(
          f'Input {x.shape[1]}x{x.shape[2]} is too small: FC-6 is a '
          f'{k[0]}x{k[1]} conv over the 1/32 map, so images must be at least '
          f'{32 * k[0]}x{32 * k[1]}.')
    for b, block in enumerate(self.blocks):
      valid = None
      if valid_size is not None:
        valid = valid_mask(valid_size, x.shape[1:3], 2 ** b)[..., None]
        valid = valid.astype(x.dtype)
      x = block(x, valid)
      out[f'block{b + 1}'] = x
    x = nnx.relu(self.fc6(x))
    out['fc6'] = x
    x = nnx.relu(self.fc7(self.dropout(x, rngs=rngs)))
    out['fc7'] = x
    scores = self.fc8(self.dropout(x, rngs=rngs)).astype(jnp.float32)
    if valid_size is not None:
      # A score position is valid when FC-6's window lies inside the image.
      valid_hw = jnp.asarray(valid_size) // 32 - jnp.asarray(k) + 1
      score_mask = valid_mask(valid_hw, scores.shape[1:3], 1)
      out['score_mask'] = score_mask
      scores = scores * score_mask[..., None]
    out['scores'] = scores
    return out

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
  # One compiled initialiser instead of one dispatch per parameter: seconds
  # instead of tens of seconds on a CPU, same values.
  return nnx.jit(lambda r: VGG(name, rngs=r, **options))(rngs)


def count_params(model: nnx.Module) -> int:
  """Number of trainable parameters (``nnx.Param``), excluding BN statistics."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      nnx.state(model, nnx.Param)))


def abstract_model(name: str, **options) -> VGG:
  """The model with shapes only (no memory, no compute): for counting."""
  return nnx.eval_shape(lambda: create_model(name, **options))


def count_macs(name: str, image_size: int = 224, *, width_multiplier: float = 1.0,
               num_classes: int = 1000, fc6_kernel: int = 7) -> int:
  """Multiply-accumulates of one forward pass on a square image.

  Counts convs and FC layers (as convs over the score map); pools, ReLU, LRN
  and BN are negligible and not counted, as in the paper's GMAC figures.

  Args:
    name: one of ``MODEL_NAMES``.
    image_size: side of the input image.
    width_multiplier: as in ``VGG``.
    num_classes: width of FC-8.
    fc6_kernel: as in ``VGG``.
  """
  arch, _ = parse_name(name)
  scaled = ModelOptions(width_multiplier=width_multiplier).scaled
  macs, c, side = 0, 3, image_size
  for layers in arch.blocks:
    for w, k in layers:
      macs += side * side * k * k * c * scaled(w)
      c = scaled(w)
    side //= 2
  h = side - fc6_kernel + 1
  fc = scaled(FC_WIDTH)
  macs += h * h * (fc6_kernel ** 2 * c * fc + fc * fc + fc * num_classes)
  return macs
