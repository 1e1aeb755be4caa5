"""Weight trees as flat ``{path: array}`` dicts, whatever stored them.

A VGG's weights are a nested dict in the ``nnx.State.to_pure_dict()`` layout
(``blocks -> 0 -> convs -> 1 -> kernel``). Orbax stores ``nnx.List`` indices
as strings (``'0'``) and may box each variable as ``{'value': array}``; these
helpers give one canonical form (int list indices, no boxes) so checkpoints,
pretrained dirs and live models compare and copy key by key.
"""

from __future__ import annotations

from typing import Any, Mapping

from flax import traverse_util

Path = tuple[Any, ...]


def _canonical_key(key: Any) -> Any:
  return int(key) if isinstance(key, str) and key.isdigit() else key


def flatten(tree: Mapping[Any, Any]) -> dict[Path, Any]:
  """Nested dict -> ``{path: leaf}``, with int list indices and no boxes."""
  flat = traverse_util.flatten_dict(dict(tree))
  return {tuple(_canonical_key(k) for k in path
                if k != 'value' or path[-1] != 'value'): v
          for path, v in flat.items()}


def unflatten(flat: Mapping[Path, Any]) -> dict[Any, Any]:
  """``{path: leaf}`` -> nested dict."""
  return traverse_util.unflatten_dict(dict(flat))


def canonical(tree: Mapping[Any, Any]) -> dict[Any, Any]:
  """A nested dict with int list indices and no ``{'value': x}`` boxes."""
  return unflatten(flatten(tree))


def path_str(path: Path) -> str:
  """``('blocks', 0, 'convs', 1, 'kernel')`` -> ``blocks.0.convs.1.kernel``."""
  return '.'.join(str(p) for p in path)
