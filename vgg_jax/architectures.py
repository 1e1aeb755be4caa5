"""The paper's Table 1 as data: the six nets, their names and options.

Pure Python (no Flax): the layer lists of configurations A-E, the model
names (each also with ``_bn``), ``ModelOptions`` (every model option with its
default, validated), and counts that follow from the table (multiply-adds).
``vgg_jax.models`` builds Flax modules from these.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

# A conv layer is (output width, kernel size); 'L' marks the LRN layer.
_A = (((64, 3),), ((128, 3),), ((256, 3),) * 2, ((512, 3),) * 2, ((512, 3),) * 2)
_B = (((64, 3),) * 2, ((128, 3),) * 2, ((256, 3),) * 2, ((512, 3),) * 2,
      ((512, 3),) * 2)
_C = (((64, 3),) * 2, ((128, 3),) * 2, ((256, 3),) * 2 + ((256, 1),),
      ((512, 3),) * 2 + ((512, 1),), ((512, 3),) * 2 + ((512, 1),))
_D = (((64, 3),) * 2, ((128, 3),) * 2, ((256, 3),) * 3, ((512, 3),) * 3,
      ((512, 3),) * 3)
# Sec. 4.1's shallow comparison net: B with each pair of 3x3 convs replaced by
# one 5x5 conv (the same receptive field, five conv layers in all).
_B_5X5 = (((64, 5),), ((128, 5),), ((256, 5),), ((512, 5),), ((512, 5),))
_E = (((64, 3),) * 2, ((128, 3),) * 2, ((256, 3),) * 4, ((512, 3),) * 4,
      ((512, 3),) * 4)


@dataclasses.dataclass(frozen=True)
class Architecture:
  """A row of Table 1 of the paper.

  Attributes:
    config: the paper's letter (A, A-LRN, B, C, D, E; B-5x5 for Sec. 4.1's
      shallow net).
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
    'vgg13_5x5': Architecture('B-5x5', _B_5X5),
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


def check_initialisation(name: str, init: str, init_from: str) -> None:
  """Refuses the start the paper says stalls: a deep plain net from std 0.01.

  Sec. 3.1: nets deeper than A (B-E, and Sec. 4.1's shallow 5x5 net) are not
  trained from the std-0.01 normal initialisation alone; they take net A's
  layers, or (the paper's footnote) Glorot's initialisation. Net A, A-LRN
  and the batch-norm variants train from std 0.01.

  Args:
    name: one of ``MODEL_NAMES``.
    init: the kernel initialisation (``config.model.init``).
    init_from: the run the weights are copied from (``config.train.init_from``;
      empty: none).

  Raises:
    ValueError: a deeper plain net with ``init='normal'`` and no ``init_from``;
      the message names the ways out.
  """
  arch, batch_norm = parse_name(name)
  exempt = batch_norm or arch.config in ('A', 'A-LRN')
  if exempt or init != 'normal' or init_from:
    return
  if arch.config == 'B-5x5':
    # Net A's 3x3 convs do not fit 5x5 kernels: only a run of this same net
    # (a fine-tuning stage) can initialise it.
    from_run = ('--config.train.init_from=<a vgg13_5x5 workdir> to fine-tune '
                "one (net A's 3x3 convs do not fit its 5x5 convs)")
  else:
    from_run = ('--config.train.init_from=<a net-A workdir> (or, for the S=384 '
                'and jittered stages, the previous stage\'s workdir)')
  raise ValueError(
      f'{name} (net {arch.config}) with init=normal (std 0.01) and no '
      'train.init_from: the paper trains only net A from this start; deeper '
      "nets stall from it without net A's layers (Sec. 3.1). Pass "
      f'{from_run}, or --config.model.init=glorot '
      "(the paper's footnote: Glorot initialisation trains it without "
      'pre-training).')
