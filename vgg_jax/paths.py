"""Paths on local disks and object stores (gs://): absolute, replaced whole."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from typing import Any, Iterator

from etils import epath


def absolute(path: str | os.PathLike) -> epath.Path:
  """Local paths made absolute (Orbax requires it); URLs (gs://) unchanged."""
  text = os.fspath(path)
  return epath.Path(text if '://' in text else os.path.abspath(text))


@contextlib.contextmanager
def replaced_atomically(target: str | os.PathLike, *, overwrite: bool = False
                        ) -> Iterator[epath.Path]:
  """Yields a temporary sibling path that becomes ``target`` on success.

  Whatever is written to the yielded path (a file or a directory) is renamed
  to ``target`` when the block ends without error, and deleted otherwise, so
  a failure or a kill leaves either the old ``target`` or the new one, never
  a partial one.

  Args:
    target: the file or directory to create.
    overwrite: replace an existing ``target``.

  Raises:
    FileExistsError: ``target`` exists and ``overwrite`` is False.
  """
  target = absolute(target)
  if target.exists() and not overwrite:
    raise FileExistsError(f'{target} exists; pass overwrite=True (CLI: '
                          '--overwrite) to replace it.')
  target.parent.mkdir(parents=True, exist_ok=True)
  tag = uuid.uuid4().hex[:8]
  tmp = target.parent / f'.{target.name}.tmp-{tag}'
  try:
    yield tmp
    if target.exists():
      old = target.parent / f'.{target.name}.old-{tag}'
      target.rename(old)
      tmp.rename(target)
      _remove(old)
    else:
      tmp.rename(target)
  finally:
    if tmp.exists():
      _remove(tmp)


def write_json(target: str | os.PathLike, data: Any, **dump_options) -> None:
  """Writes ``data`` as JSON to ``target``, replacing it whole.

  Args:
    target: the file.
    data: JSON-serialisable data.
    **dump_options: ``json.dumps`` options (``indent``, ``sort_keys``).
  """
  with replaced_atomically(target, overwrite=True) as tmp:
    tmp.write_text(json.dumps(data, **dump_options))


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
  """The JSON in ``path``, or ``default`` when there is no such file."""
  path = absolute(path)
  return json.loads(path.read_text()) if path.exists() else default


def _remove(path: epath.Path) -> None:
  if path.is_dir():
    shutil.rmtree(path) if '://' not in os.fspath(path) else path.rmtree()
  else:
    path.unlink()
