"""One command-line style for every vgg_jax program.

Each program module defines ``define_flags(flag_values)`` and
``main(flag_values) -> int`` and ends with::

    if __name__ == '__main__':
      cli.run(define_flags, main)

``run`` parses absl flags (so ``--help``/``--helpfull`` work as in every absl
program) and turns user errors (a bad value, a missing file, a checkpoint
that does not fit) into one line on stderr and exit status 1, never a
traceback. Tests and notebooks call ``call(define_flags, main, argv)``, which
parses into a fresh ``FlagValues`` so programs can run one after the other in
one process.

Config overrides: a program whose config is a file known at parse time uses
``config_flags.DEFINE_config_file`` directly (``vgg_jax.main``). A program
that reads the config from a workdir afterwards (``evaluate``, ``predict``)
defines ``--config`` with ``define_config_overrides``, which parses
``--config.field=value`` against the base config's field types, and applies
what the user set with ``apply_config_overrides``.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from vgg_jax.configs import base

# Exceptions that mean "the user asked for something that cannot be done";
# anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError,
               NotADirectoryError, PermissionError, ImportError)

DefineFlags = Callable[[flags.FlagValues], None]
# main(flag_values) or, for programs taking positional arguments (file
# names), main(flag_values, args).
Main = Callable[..., 'int | None']


def program_name() -> str:
  """``vgg_jax.evaluate`` for ``python -m vgg_jax.evaluate``."""
  main_module = sys.modules.get('__main__')
  spec = getattr(main_module, '__spec__', None)
  return getattr(spec, 'name', None) or 'vgg_jax'


def error_line(error: BaseException, program: str | None = None) -> str:
  """The one line printed for a user error: ``program: error: message``."""
  message = ' '.join(str(error).split()) or type(error).__name__
  return f'{program or program_name()}: error: {message}'


def _guarded(main: Main, flag_values: flags.FlagValues,
             args: Sequence[str] | None) -> int:
  try:
    status = main(flag_values) if args is None else main(flag_values, args)
    return int(status or 0)
  except USER_ERRORS as e:
    logging.flush()
    print(error_line(e), file=sys.stderr)
    return 1


def run(define_flags: DefineFlags, main: Main, *,
        positional: bool = False) -> None:
  """Runs a program under ``absl.app.run`` with the project's error style.

  Args:
    define_flags: registers the program's flags on the given ``FlagValues``.
    main: the program; returns its exit status (None: 0).
    positional: the program takes positional arguments, passed to
      ``main(flag_values, args)``; otherwise any is a usage error.
  """
  try:
    _define(define_flags, flags.FLAGS, sys.argv)
  except flags.Error as e:
    sys.exit(error_line(e))
  app.run(functools.partial(_absl_main, main, positional),
          flags_parser=_parse_flags)


def _parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing with a bad value reported in the one-line style."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(error_line(e) + ' (see --helpfull)')


def _define(define_flags: DefineFlags, flag_values: flags.FlagValues,
            argv: Sequence[str]) -> None:
  """``define_flags``, with config_flags' errors for unknown fields as flags.Error."""
  try:
    define_flags(flag_values)
  except (AttributeError, KeyError) as e:
    # config_flags looks every --config.a.b up in the config when the flag is
    # defined; a field that does not exist surfaces here.
    unknown = [a.split('=')[0] for a in argv[1:] if a.startswith('--config.')]
    if not unknown:
      raise
    raise flags.Error(f'Unknown config field among {", ".join(unknown)} '
                      f'({e}); fields are listed in vgg_jax/configs/base.py.'
                      ) from None


def _absl_main(main: Main, positional: bool, argv: Sequence[str]) -> int:
  args = list(argv[1:])
  if args and not positional:
    raise app.UsageError(f'Unexpected arguments: {" ".join(args)}')
  return _guarded(main, flags.FLAGS, args if positional else None)


def call(define_flags: DefineFlags, main: Main, argv: Sequence[str], *,
         positional: bool = False) -> int:
  """Runs a program in-process on its own flags (tests, notebooks).

  Args:
    define_flags: as for ``run``.
    main: as for ``run``.
    argv: the arguments after the program name.
    positional: as for ``run``.

  Returns:
    The exit status: 0 on success, 1 after a one-line user error.
  """
  flag_values = flags.FlagValues()
  # config_flags reads the --config.field flags from sys.argv when the config
  # flag is defined and again when it is parsed: both must see this argv.
  saved, sys.argv = sys.argv, ['prog', *argv]
  try:
    _define(define_flags, flag_values, sys.argv)
    args = flag_values(sys.argv)[1:]
    if args and not positional:
      raise flags.Error(f'Unexpected arguments: {" ".join(args)}')
  except flags.Error as e:
    print(error_line(e), file=sys.stderr)
    return 1
  finally:
    sys.argv = saved
  return _guarded(main, flag_values, args if positional else None)


def define_config_overrides(flag_values: flags.FlagValues) -> None:
  """``--config.field=value`` overrides, typed by the base config's fields.

  Args:
    flag_values: where to register the ``config`` flag.
  """
  config_flags.DEFINE_config_dict(
      'config', base.get_config(),
      'Overrides of the run\'s config, e.g. --config.data.manual_dir=/data '
      '(fields as in vgg_jax/configs/base.py).', flag_values=flag_values)


def apply_config_overrides(config: ml_collections.ConfigDict,
                           flag_values: flags.FlagValues
                           ) -> ml_collections.ConfigDict:
  """Sets on ``config`` the fields given as ``--config.field=value``.

  Args:
    config: a run's config (e.g. read from its workdir); changed in place.
    flag_values: parsed flags holding a ``define_config_overrides`` flag.

  Returns:
    ``config``.

  Raises:
    ValueError: a field the run's config does not have, or a value its type
      refuses.
  """
  overrides = config_flags.get_override_values(flag_values['config'])
  with config.unlocked():
    for key, value in overrides.items():
      node = config
      *parents, leaf = key.split('.')
      for part in parents:
        node = node.get(part) if isinstance(node, ml_collections.ConfigDict) \
            else None
      if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise ValueError(f'Unknown config field {key!r} in this run\'s '
                         'config.')
      try:
        node[leaf] = value
      except TypeError as e:
        raise ValueError(f'Bad value {value!r} for --config.{key}: {e}') \
            from None
  return config


def comma_list(text: str | None) -> list[str]:
  """``'a, b,,c'`` -> ``['a', 'b', 'c']``; None or '' -> ``[]``."""
  return [t.strip() for t in (text or '').split(',') if t.strip()]
