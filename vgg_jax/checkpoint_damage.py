"""Damaged checkpoints, found from their files without reading the arrays.

A checkpoint is damaged when a JSON file it needs is missing or unparsable,
or when a file that TensorStore's OCDBT index of its arrays refers to is
missing or shorter than the bytes the index places in it (a truncated or
deleted array file). Only the index is read, so checking a checkpoint of
any size takes milliseconds; ``vgg_jax.checkpointing`` checks before
restoring, and falls back to an older checkpoint or refuses.
"""

from __future__ import annotations

import json

from etils import epath
import tensorstore as ts


def error_summary(error: BaseException) -> str:
  """The innermost cause of ``error`` on one line; if long, start and end."""
  # TensorStore nests causes and ends with the OS's reason (File too large).
  while error.__cause__ is not None:
    error = error.__cause__
  text = ' '.join(str(error).split()) or type(error).__name__
  return text if len(text) <= 700 else f'{text[:250]} ... {text[-400:]}'


def find(root: epath.Path) -> str | None:
  """What is wrong with one checkpoint's files, or None if nothing is.

  Reads the JSON files and TensorStore's OCDBT index, not the arrays: every
  file the index refers to must exist and hold the bytes it places there.

  Args:
    root: the checkpoint's directory (``<workdir>/checkpoints/<step>``).

  Returns:
    ``'<file, relative to the checkpoint>: <what is wrong>'`` for the first
    damaged file found, or None.
  """
  return _damaged_json(root) or _damaged_arrays(root / 'state')


# JSON files a checkpoint must have, and those it may have, relative to it.
_REQUIRED_JSON = ('meta/metadata', 'state/_METADATA')
_OPTIONAL_JSON = ('_CHECKPOINT_METADATA', 'metrics/metrics')


def _damaged_json(root: epath.Path) -> str | None:
  # Besides the metadata: the Grain iterator state of each process.
  iterators = sorted(f'data/{p.name}' for p in (root / 'data').glob('*.json'))
  for name in (*_REQUIRED_JSON, *iterators, *_OPTIONAL_JSON):
    path = root / name
    if not path.exists():
      if name not in _OPTIONAL_JSON:
        return f'{name}: missing'
      continue
    try:
      json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
      return f'{name}: unparsable ({e})'
  return None


def _damaged_arrays(state: epath.Path) -> str | None:
  """Walks the OCDBT B-tree of ``state``, checking every file it refers to."""
  if not (state / 'manifest.ocdbt').exists():
    return None  # not OCDBT (older Orbax layouts): restoring checks it
  try:
    kvstore = ts.KvStore.open(
        {'driver': 'file', 'path': str(state) + '/'}).result()
    versions = ts.ocdbt.dump(kvstore).result()['versions']
  except Exception as e:  # pylint: disable=broad-except
    return f'state/manifest.ocdbt: unreadable ({error_summary(e)})'
  nodes = [versions[-1]['root'].get('location')] if versions else []
  data_ends: dict[str, int] = {}  # array data file -> the end of its data
  while nodes:
    location = nodes.pop()
    if not location:  # an empty tree
      continue
    name, end = _located(location)
    damage = _damaged_file(state, name, end)
    if damage:
      return damage
    try:
      entries = ts.ocdbt.dump(kvstore, location).result()['entries']
    except Exception as e:  # pylint: disable=broad-except
      return f'state/{name}: unreadable ({error_summary(e)})'
    for value in (v for entry in entries for v in entry.values()):
      if isinstance(value, str) and value.startswith('btreenode:'):
        nodes.append(value)
      elif isinstance(value, str) and value.startswith('value:'):
        name, end = _located(value)
        data_ends[name] = max(end, data_ends.get(name, 0))
  for name, end in sorted(data_ends.items()):
    damage = _damaged_file(state, name, end)
    if damage:
      return damage
  return None


def _located(location: str) -> tuple[str, int]:
  """``'value:ocdbt.process_0/:d/ab12:504668:9781'`` -> (file, end byte)."""
  # OCDBT locations are kind:base_path:relative_path:offset:length.
  _, rest = location.split(':', 1)
  path, offset, length = rest.rsplit(':', 2)
  base, relative = path.split(':', 1)
  return base + relative, int(offset) + int(length)


def _damaged_file(state: epath.Path, name: str, end: int) -> str | None:
  path = state / name
  if not path.exists():
    return f'state/{name}: missing'
  size = path.stat().length
  if size < end:
    return (f'state/{name}: {size} bytes, but the checkpoint\'s index puts '
            f'data up to byte {end} (truncated)')
  return None
