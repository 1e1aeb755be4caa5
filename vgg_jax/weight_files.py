"""Reading and writing weights files: PyTorch pickles, safetensors, Keras HDF5.

Every reader returns a flat ``{tensor name: NumPy array}``; which names a
model's file must hold is ``vgg_jax.layouts``' business.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Mapping

from etils import epath
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

TORCH_PICKLE_SUFFIXES = ('.pth', '.pt', '.bin', '.ckpt')


def file_sha256(path) -> str:
  """SHA-256 of a file, streamed."""
  digest = hashlib.sha256()
  with epath.Path(path).open('rb') as f:
    for chunk in iter(lambda: f.read(1 << 24), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _import_torch(why: str):
  # torch is optional and heavy: only .pth/.pt files need it.
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(why) from e
  return torch


def _strip_module_prefix(tensors: dict[str, Any]) -> dict[str, Any]:
  # nn.DataParallel / DDP checkpoints prefix every key with "module.".
  if tensors and all(k.startswith('module.') for k in tensors):
    return {k[len('module.'):]: v for k, v in tensors.items()}
  return tensors


def _read_torch_pickle(path: str) -> dict[str, np.ndarray]:
  torch = _import_torch(
      f'Reading {path} (a PyTorch pickle) needs torch, which is not '
      'installed. Install it (pip install torch), or convert the file to '
      'safetensors where torch is available: safetensors.torch.save_file('
      'torch.load(path), "weights.safetensors").')
  obj = torch.load(path, map_location='cpu', weights_only=True)
  for wrapper in ('state_dict', 'model'):
    if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
      obj = obj[wrapper]
  if not isinstance(obj, Mapping):
    raise ValueError(f'{path} holds a {type(obj).__name__}, not a state dict.')
  out = {}
  for k, v in obj.items():
    if not hasattr(v, 'numpy'):
      raise ValueError(f'{path}: entry {k!r} is a {type(v).__name__}, not a '
                       'tensor.')
    v = v.detach().cpu()
    out[k] = (v.float() if v.is_floating_point() else v).numpy()
  return out


def _read_safetensors(path: str) -> tuple[dict[str, np.ndarray],
                                          dict[str, str]]:
  with safetensors.safe_open(path, framework='numpy') as f:
    header = f.metadata() or {}
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  return tensors, header


def _h5_attr_list(group, name: str) -> list[str]:
  # Keras splits long attributes into name0, name1, ... (HDF5 header limit).
  if name in group.attrs:
    values = list(group.attrs[name])
  else:
    values, i = [], 0
    while f'{name}{i}' in group.attrs:
      values.extend(group.attrs[f'{name}{i}'])
      i += 1
  return [v.decode('utf8') if isinstance(v, bytes) else str(v) for v in values]


def _h5_array(dataset) -> np.ndarray:
  if dataset.attrs.get('dtype') == 'bfloat16':  # Keras 3 stores bf16 so
    return np.asarray(dataset).view(jnp.bfloat16).astype(np.float32)
  return np.asarray(dataset)


def _name_layer_weights(layer: str, arrays: list[np.ndarray],
                        out: dict[str, np.ndarray]) -> None:
  # Keras writes kernel then bias, but the published VGG files use Keras 1
  # names (block1_conv1_W_1:0), so go by rank, not by name.
  if (len(arrays) == 2 and arrays[0].ndim >= 2 and arrays[1].ndim == 1):
    out[f'{layer}/kernel'], out[f'{layer}/bias'] = arrays
  else:
    for j, a in enumerate(arrays):
      out[f'{layer}/{j}'] = a


def _read_legacy_h5(group) -> dict[str, np.ndarray]:
  """Keras 2 / tf.keras ``.h5``: ``layer_names``, then each ``weight_names``."""
  out: dict[str, np.ndarray] = {}
  for layer in _h5_attr_list(group, 'layer_names'):
    g = group[layer]
    arrays = [_h5_array(g[w]) for w in _h5_attr_list(g, 'weight_names')]
    if arrays:
      _name_layer_weights(layer, arrays, out)
  return out


def _read_keras3_h5(path: str, layers) -> dict[str, np.ndarray]:
  """Keras 3 ``.weights.h5``: ``layers/<attr>/vars/<i>``, named by attribute."""
  names = []
  layers.visit(names.append)  # every group and dataset below layers/
  out: dict[str, np.ndarray] = {}
  unnamed = []
  for name in names:
    group = layers[name]
    # A group (datasets have no keys) of a layer that has weights.
    if (not name.endswith('/vars') or not hasattr(group, 'keys') or
        not len(group)):
      continue
    layer = group.attrs.get('name')
    if layer is None:
      unnamed.append(name)
      continue
    layer = layer.decode() if isinstance(layer, bytes) else str(layer)
    arrays = [_h5_array(group[k]) for k in sorted(group.keys(), key=int)]
    _name_layer_weights(layer, arrays, out)
  if unnamed:
    raise ValueError(
        f'{path}: the groups {", ".join(unnamed[:5])} carry no layer '
        'name (an older Keras 3 wrote this file). Load it into '
        'keras.applications.VGG16/VGG19 and save it again with a recent '
        'Keras, or as a legacy .h5.')
  return out


def _read_keras_h5(path: str) -> dict[str, np.ndarray]:
  """Keras weights, as ``{'<layer>/kernel': ..., '<layer>/bias': ...}``."""
  # h5py comes with TensorFlow/Keras rather than as a declared dependency,
  # and only Keras files need it.
  import h5py  # pylint: disable=g-import-not-at-top
  with h5py.File(path, 'r') as f:
    group = f['model_weights'] if 'model_weights' in f else f
    if _h5_attr_list(group, 'layer_names'):
      return _read_legacy_h5(group)
    if 'layers' in f:
      return _read_keras3_h5(path, f['layers'])
  raise ValueError(f'{path} is neither a legacy Keras .h5 weights file '
                   '(no layer_names attribute) nor a Keras 3 .weights.h5 '
                   '(no layers/ group).')


def read_weights(path, *, keras: bool = False
                 ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """The tensors of a weights file, and its safetensors header if any.

  Args:
    path: ``.safetensors`` or a PyTorch pickle (``.pth``, ``.pt``, ``.bin``,
      ``.ckpt``); with ``keras``, ``.h5`` / ``.weights.h5``.
    keras: read a Keras HDF5 file.

  Returns:
    ``({name: array}, header)``; ``header`` is the safetensors metadata (empty
    for other formats). A DataParallel ``module.`` prefix is dropped.

  Raises:
    FileNotFoundError: no such file.
    ValueError: a format that cannot be told from the name, or a file that
      does not hold a state dict.
    ImportError: a PyTorch pickle without torch installed.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No such file: {path}')
  lower = path.lower()
  if keras:
    if not lower.endswith('.h5'):
      raise ValueError(f'Keras weights must be .h5 or .weights.h5, got '
                       f'{path}.')
    return _read_keras_h5(path), {}
  if lower.endswith('.safetensors'):
    tensors, header = _read_safetensors(path)
  elif lower.endswith(TORCH_PICKLE_SUFFIXES):
    tensors, header = _read_torch_pickle(path), {}
  else:
    raise ValueError(f'Cannot tell the format of {path}: expected '
                     '.safetensors or one of '
                     f'{", ".join(TORCH_PICKLE_SUFFIXES)}.')
  return _strip_module_prefix(tensors), header


def is_torch_pickle(path, *, allowed: bool = True) -> bool:
  """Whether ``path`` names a PyTorch pickle (else it names safetensors).

  Args:
    path: a file to write.
    allowed: whether a PyTorch pickle is acceptable here.

  Raises:
    ValueError: ``path`` ends in neither suffix (or in a pickle's when not
      ``allowed``).
  """
  suffix = epath.Path(path).suffix.lower()
  if suffix == '.safetensors':
    return False
  if allowed and suffix in TORCH_PICKLE_SUFFIXES:
    return True
  raise ValueError(f'Output {path} must end in .safetensors' + (
      f' or one of {", ".join(TORCH_PICKLE_SUFFIXES)} (needs torch)'
      if allowed else '') + '.')


def write_weights(path, tensors: Mapping[str, np.ndarray], *,
                  torch_pickle: bool = False,
                  header: Mapping[str, str] | None = None) -> None:
  """Writes ``{name: array}`` as safetensors, or as a PyTorch pickle.

  Args:
    path: the file (any name: it may be a temporary one).
    tensors: the arrays.
    torch_pickle: write with ``torch.save`` (needs torch) instead of
      safetensors.
    header: safetensors metadata (not written to pickles).
  """
  if not torch_pickle:
    safetensors.numpy.save_file(dict(tensors), os.fspath(path),
                                metadata=dict(header or {}))
    return
  torch = _import_torch('Writing a PyTorch pickle needs torch, which is not '
                        'installed; write .safetensors instead.')
  torch.save({k: torch.from_numpy(v) for k, v in tensors.items()},
             os.fspath(path))
