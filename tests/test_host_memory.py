"""Huge-page malloc: when a program re-executes itself, and what it keeps."""

import os
import platform
import subprocess
import sys

import pytest

from vgg_jax import host_memory

LINUX = dict(system='Linux', libc=('glibc', '2.36'), thp='madvise')


def test_adds_the_tunable_and_marks_the_new_process():
  env = host_memory.huge_page_environment({'PATH': '/bin'}, **LINUX)
  assert env == {'PATH': '/bin', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1',
                 'VGG_JAX_HUGE_PAGES': '1'}
  # The re-executed process must not re-execute again.
  assert host_memory.huge_page_environment(env, **LINUX) is None


def test_keeps_the_users_other_tunables():
  env = host_memory.huge_page_environment(
      {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, **LINUX)
  assert env['GLIBC_TUNABLES'] == (
      'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1')


@pytest.mark.parametrize('environ', [
    {'VGG_JAX_HUGE_PAGES': '0'},                      # switched off
    {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'},     # the user's choice
    {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=2'},
])
def test_leaves_an_environment_that_decided(environ):
  assert host_memory.huge_page_environment(environ, **LINUX) is None


@pytest.mark.parametrize('where', [
    dict(LINUX, thp='always'),         # malloc's mappings get them anyway
    dict(LINUX, thp='never'),          # of no use
    dict(LINUX, thp=None),             # no sysfs file
    dict(LINUX, libc=('glibc', '2.34')),  # before the tunable
    dict(LINUX, libc=('', '')),        # musl
    dict(LINUX, system='Darwin', libc=('', '')),
])
def test_does_nothing_where_it_cannot_help(where):
  assert host_memory.huge_page_environment({}, **where) is None


def test_reads_the_selected_thp_mode(tmp_path):
  path = tmp_path / 'enabled'
  path.write_text('always [madvise] never\n')
  assert host_memory.thp_mode(str(path)) == 'madvise'
  assert host_memory.thp_mode(str(tmp_path / 'missing')) is None


_CHILD = '''
import os, sys
print('start', os.getpid(), flush=True)
from vgg_jax import host_memory
if __name__ == '__main__':
  host_memory.reexec_with_huge_pages()
print('ready', os.getpid(), os.environ.get('GLIBC_TUNABLES', ''),
      sys.argv[1:], sys.flags.utf8_mode, host_memory.describe(), sep='|')
'''


def test_a_program_re_executes_once_keeping_pid_arguments_and_options(
    tmp_path):
  script = tmp_path / 'program.py'
  script.write_text(_CHILD)
  env = {k: v for k, v in os.environ.items()
         if k not in ('GLIBC_TUNABLES', host_memory.SWITCH)}
  out = subprocess.run(
      [sys.executable, '-X', 'utf8', str(script), 'two words', '--flag=1'],
      env=env, capture_output=True, text=True, check=True, timeout=60).stdout
  starts = [line.split()[1] for line in out.splitlines()
            if line.startswith('start')]
  pid, tunables, argv, utf8, described = out.splitlines()[-1].split('|')[1:]
  expected = host_memory.huge_page_environment(
      env, system=platform.system(), libc=platform.libc_ver(),
      thp=host_memory.thp_mode())
  assert argv == "['two words', '--flag=1']" and utf8 == '1'
  assert set(starts) == {pid}
  if expected is None:  # a machine where it cannot help: one start
    assert len(starts) == 1 and tunables == ''
  else:
    assert len(starts) == 2
    assert tunables == 'glibc.malloc.hugetlb=1'
    assert described.startswith('malloc huge pages: on')
