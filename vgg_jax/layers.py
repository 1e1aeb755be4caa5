"""Every layer of a VGG net by the name users know, and where others keep it.

Names follow the Caffe deploy files of the VGG release (the names Gatys et
al. and Johnson et al. use), one per activation in forward order:

* ``conv{b}_{i}``: the i-th conv of block b, before batch norm and ReLU.
* ``bn{b}_{i}``: its batch norm's output, before ReLU (``_bn`` nets only).
* ``relu{b}_{i}``: after the ReLU.
* ``lrn1``: after the LRN that follows ``relu1_1`` (A-LRN, ``vgg11_lrn``,
  only); ``relu1_1`` is before it.
* ``pool{b}``: block b's output, after the 2x2/2 max-pool.
* ``fc6``, ``fc7``: FC-6 and FC-7 before ReLU; ``relu6``, ``relu7`` after it
  (before dropout). ``relu7`` is the classic 4,096-d VGG feature.
* ``fc8``: the class scores (logits, before the soft-max).

Blocks are numbered 1-5 and convs from 1 within a block, so net B-5x5
(``vgg13_5x5``, one conv per block) has ``conv1_1`` ... ``conv5_1``.

Where torchvision and Keras expose the same activation (``layer_table``):

* torchvision ``vgg*``: ``features.N`` and ``classifier.N`` are indices into
  its two ``nn.Sequential``; a forward hook on module N sees our layer.
  Its ReLUs are in place, so a *stored* conv (or BN) output is overwritten
  by the ReLU that follows: copy it in the hook to get ``conv{b}_{i}``.
  Its classifier works on the flattened 7x7 map, which equals our 1x1 FC
  maps at 224 x 224 (at other sizes ours are maps, see ``VGG.features``).
* Keras ``VGG16``/``VGG19``: ``block{b}_conv{i}`` has the ReLU built in, so
  it is ``relu{b}_{i}`` (there is no pre-ReLU output); ``fc1``/``fc2`` are
  ``relu6``/``relu7``; ``predictions`` is the soft-max of ``fc8``.

Print the table of a net as Markdown::

    python -c "from vgg_jax import layers; print(layers.layer_table_markdown('vgg16'))"
"""

from __future__ import annotations

from typing import Any, Iterable

from vgg_jax.architectures import FC_WIDTH
from vgg_jax.architectures import parse_name

# The nets torchvision's (and timm's) ``vgg*`` and Keras' applications have.
TORCHVISION_MODELS = tuple(n + bn for n in ('vgg11', 'vgg13', 'vgg16', 'vgg19')
                           for bn in ('', '_bn'))
KERAS_MODELS = ('vgg16', 'vgg19')
HEAD_ACTIVATIONS = ('fc6', 'relu6', 'fc7', 'relu7', 'fc8')
_COLUMNS = ('layer', 'op', 'stride', 'torchvision', 'keras')


def conv_name(kind: str, block: int, index: int) -> str:
  """``'conv'``/``'bn'``/``'relu'`` of conv ``index`` of ``block`` (0-based)."""
  return f'{kind}{block + 1}_{index + 1}'


def pool_name(block: int) -> str:
  """The max-pool output of ``block`` (0-based): ``pool1`` ... ``pool5``."""
  return f'pool{block + 1}'


LRN_NAME = 'lrn1'


def _trunk_rows(name: str) -> list[dict[str, Any]]:
  arch, batch_norm = parse_name(name)
  torch = name in TORCHVISION_MODELS
  keras = name in KERAS_MODELS
  rows, idx = [], 0  # idx: torchvision's features.N, as its make_layers
  for b, block in enumerate(arch.blocks):
    stride = 2 ** b
    for i, (width, k) in enumerate(block):
      ops = [('conv', f'conv{k}-{width}')]
      if batch_norm:
        ops.append(('bn', 'BN'))
      ops.append(('relu', 'ReLU'))
      for kind, op in ops:
        rows.append(dict(
            layer=conv_name(kind, b, i), op=op, stride=stride,
            torchvision=f'features.{idx}' if torch else None,
            keras=f'block{b + 1}_conv{i + 1}' if keras and kind == 'relu'
            else None))
        idx += 1
      if arch.lrn and b == 0 and i == 0:
        rows.append(dict(layer=LRN_NAME, op='LRN', stride=stride,
                         torchvision=None, keras=None))
    rows.append(dict(layer=pool_name(b), op='maxpool', stride=2 * stride,
                     torchvision=f'features.{idx}' if torch else None,
                     keras=f'block{b + 1}_pool' if keras else None))
    idx += 1
  return rows


def _head_rows(name: str) -> list[dict[str, Any]]:
  torch = name in TORCHVISION_MODELS
  keras = name in KERAS_MODELS
  ops = (f'FC-{FC_WIDTH}', 'ReLU', f'FC-{FC_WIDTH}', 'ReLU', 'FC-1000')
  torch_idx = (0, 1, 3, 4, 6)  # 2 and 5 are dropout
  keras_names = (None, 'fc1', None, 'fc2', 'predictions')
  return [dict(layer=layer, op=op, stride=32,
               torchvision=f'classifier.{i}' if torch else None,
               keras=k if keras else None)
          for layer, op, i, k in zip(HEAD_ACTIVATIONS, ops, torch_idx,
                                     keras_names)]


def layer_table(name: str) -> list[dict[str, Any]]:
  """One row per named activation of a net, in forward order.

  Args:
    name: one of ``MODEL_NAMES``.

  Returns:
    Dicts with ``layer`` (our name), ``op`` (what produces it, as Table 1
    writes it at full width: ``'conv3-64'``, ``'BN'``, ``'ReLU'``, ``'LRN'``,
    ``'maxpool'``, ``'FC-4096'``, ``'FC-1000'``), ``stride`` (input pixels
    per map position; the head's is 32 with FC-6's window on top),
    ``torchvision`` (``'features.N'``/``'classifier.N'``, None where the
    torchvision net lacks it or torchvision lacks the net) and ``keras``
    (Keras' layer name, None likewise; see the module docstring for what
    matches what).

  Raises:
    ValueError: unknown model name.
  """
  return _trunk_rows(name) + _head_rows(name)


def layer_names(name: str) -> list[str]:
  """Every layer name of a net (``conv1_1``, ..., ``fc8``) in forward order."""
  return [row['layer'] for row in layer_table(name)]


def check_layers(name: str, requested: Iterable[str]) -> list[str]:
  """The requested names, checked against the net's.

  Args:
    name: one of ``MODEL_NAMES``.
    requested: layer names.

  Returns:
    ``requested`` as a list.

  Raises:
    ValueError: a name the net lacks; the message lists the valid ones.
  """
  requested = list(requested)
  valid = layer_names(name)
  unknown = [layer for layer in requested if layer not in valid]
  if unknown:
    raise ValueError(f'{name} has no layer(s) {", ".join(map(repr, unknown))}; '
                     f'valid layers of {name}: {", ".join(valid)}.')
  return requested


def _cell(column: str, value: Any) -> str:
  if value is None:
    return '-'
  return str(value) if column in ('op', 'stride') else f'`{value}`'


def layer_table_markdown(name: str) -> str:
  """``layer_table(name)`` as a Markdown table with a note on what matches.

  Args:
    name: one of ``MODEL_NAMES``.
  """
  header = ('Layer', 'Op', 'Stride', 'torchvision', 'Keras')
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '|'.join('---' for _ in header) + '|']
  for row in layer_table(name):
    lines.append('| ' + ' | '.join(_cell(c, row[c]) for c in _COLUMNS) + ' |')
  lines.append('')
  lines.append(
      'Conv and FC names are before the ReLU, `relu*` after it. torchvision\'s '
      'ReLUs are in place (copy a conv output in the hook); Keras convs '
      'include the ReLU, `fc1`/`fc2` are after it and `predictions` is the '
      'soft-max of `fc8`.')
  return '\n'.join(lines)
