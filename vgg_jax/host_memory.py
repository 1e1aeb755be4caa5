"""Transparent huge pages for XLA:CPU's buffers (Linux with glibc).

XLA:CPU allocates a step's buffers afresh with ``malloc``, and glibc serves
every block over 32 MB with a fresh ``mmap``: each step then touches its
activations for the first time, and the kernel faults them in and zeroes
them 4 KB at a time. On this project's 2-core EPYC that held XLA's copies to
6 GB/s (``memcpy``: 24 GB/s) and cost 7-15% of a VGG training step
(BENCHMARKS.md, "Huge pages"). glibc's tunable ``glibc.malloc.hugetlb=1``
has ``malloc`` ask for 2 MB transparent huge pages on those mappings; glibc
reads it only when a process starts, so a program re-executes itself with
it once, before it imports JAX::

    if __name__ == '__main__':
      host_memory.reexec_with_huge_pages()

``VGG_JAX_HUGE_PAGES=0`` keeps the environment as it is; a
``GLIBC_TUNABLES`` that already sets ``glibc.malloc.hugetlb`` is the user's
choice and is kept too. Nothing happens where it cannot help: not Linux,
not glibc 2.35 or newer (where the tunable appeared), or the kernel's
transparent huge pages ``always`` on (malloc's mappings get them anyway) or
``never``. Child processes (Grain workers, a study's runs) inherit it.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from typing import Mapping

TUNABLE = 'glibc.malloc.hugetlb'
# Set to '0' to keep the environment; the re-executed process sees '1'.
SWITCH = 'VGG_JAX_HUGE_PAGES'
THP_ENABLED = '/sys/kernel/mm/transparent_hugepage/enabled'
_MIN_GLIBC = (2, 35)


def thp_mode(path: str = THP_ENABLED) -> str | None:
  """The kernel's transparent huge page mode (``always``/``madvise``/``never``).

  Args:
    path: the sysfs file that names it (the selected mode in brackets).

  Returns:
    The selected mode, or None where the file is missing or unreadable.
  """
  try:
    with open(path, encoding='ascii') as f:
      selected = re.search(r'\[(\w+)\]', f.read())
  except OSError:
    return None
  return selected.group(1) if selected else None


def _glibc_at_least(libc: tuple[str, str], minimum: tuple[int, int]) -> bool:
  name, version = libc
  numbers = re.match(r'(\d+)\.(\d+)', version or '')
  return name == 'glibc' and bool(numbers) and (
      (int(numbers.group(1)), int(numbers.group(2))) >= minimum)


def huge_page_environment(environ: Mapping[str, str], *, system: str,
                          libc: tuple[str, str], thp: str | None
                          ) -> dict[str, str] | None:
  """The environment to re-execute with, or None to keep this one.

  Args:
    environ: the current environment.
    system: ``platform.system()``.
    libc: ``platform.libc_ver()``.
    thp: ``thp_mode()``.

  Returns:
    A copy of ``environ`` with ``glibc.malloc.hugetlb=1`` added to
    ``GLIBC_TUNABLES`` (and ``VGG_JAX_HUGE_PAGES=1``, so the new process
    does not re-execute again), or None when switched off, already set, or
    of no use here.
  """
  if environ.get(SWITCH, 'auto') != 'auto':
    return None
  tunables = environ.get('GLIBC_TUNABLES', '')
  if TUNABLE in tunables:
    return None
  if system != 'Linux' or thp != 'madvise' or not _glibc_at_least(
      libc, _MIN_GLIBC):
    return None
  env = dict(environ)
  env['GLIBC_TUNABLES'] = ':'.join(t for t in (tunables, f'{TUNABLE}=1') if t)
  env[SWITCH] = '1'
  return env


def reexec_with_huge_pages() -> None:
  """Replaces this process by the same command with huge-page ``malloc``.

  Call it first in a program's ``__main__`` block, before JAX is imported;
  it returns without doing anything where ``huge_page_environment`` says so.
  The process keeps its PID, arguments and interpreter options.
  """
  env = huge_page_environment(os.environ, system=platform.system(),
                              libc=platform.libc_ver(), thp=thp_mode())
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)


def describe(environ: Mapping[str, str] = os.environ) -> str:
  """One line for logs and benchmark headers: are huge pages in use?

  Args:
    environ: the environment to describe.
  """
  mode = thp_mode()
  tunables = environ.get('GLIBC_TUNABLES', '')
  if mode == 'always':
    return 'malloc huge pages: on (transparent huge pages: always)'
  if f'{TUNABLE}=1' in tunables or f'{TUNABLE}=2' in tunables:
    return (f'malloc huge pages: on (GLIBC_TUNABLES={tunables}, '
            f'transparent huge pages: {mode})')
  return (f'malloc huge pages: off (transparent huge pages: {mode}; '
          f'{SWITCH}={environ.get(SWITCH, "auto")})')
