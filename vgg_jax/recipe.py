r"""The paper's whole recipe for one net as one resumable command.

Sec. 3.1 trains a net in a chain: net A from random weights; the deeper net
at S=256 from net A's layers; at S=384 from that run (lr 1e-3); with S drawn
from [256, 512] from that one. Sec. 3.2 and 4 then test it at one scale
(Table 3), at several (Table 4) and with dense, multi-crop and both
(Table 5). This module runs that chain and those evaluations::

    python -m vgg_jax.recipe --net=vgg16 --root=gs://bucket/recipes/vgg16
    python -m vgg_jax.recipe --net=vgg16 --root=DIR --dry_run
    python -m vgg_jax.recipe --net=vgg16 --root=DIR \
      --config.data.data_dir=gs://bucket/tensorflow_datasets
    # the same chain at small scale (32 px crops: S = 37, 55, [37, 73])
    python -m vgg_jax.recipe --net=vgg13 --root=DIR \
      --base_config=configs/quickstart.py --config.model.width_multiplier=0.125

On TPU VMs ``launch/train_tpu.sh --recipe=vgg16`` runs it on every worker
(``launch/keep_training.sh --recipe=vgg16`` through preemptions).

Each stage trains in its own workdir under the root (``vgg11``,
``vgg16_s256``, ``vgg16_s384``, ``vgg16_jitter``) with the stage's config
(``vgg_jax.configs.base.apply_stage``; ``--config.field=value`` applies to
every stage) and ``train.init_from`` set to its parent. A stage that ends
(``done`` or ``plateau``) gets a ``recipe_done.json`` marker; a rerun skips
marked stages and resumes an interrupted one from its checkpoint, so the
same command continues after any kill or preemption. Each evaluation is
written to ``ROOT/eval/<name>.json`` once and ``ROOT/results.md`` puts every
number beside the paper's. ``ROOT/recipe.json`` records the net and the root:
a rerun naming another net or root is refused rather than mixing workdirs.

Which nets take net A's layers: B, C, D and E. Net A (``vgg11``) is its own
first stage (workdir ``vgg11``); A-LRN trains from random weights; the
shallow 5x5 net cannot take A's 3x3 convs and starts from Glorot
(``base.NO_NET_A_INIT``); the ``_bn`` variants train from scratch (batch norm
needs no pre-training) and keep the config's init.
"""

from __future__ import annotations

from vgg_jax import host_memory

if __name__ == '__main__':  # first: glibc reads its tunables at start-up
  host_memory.reexec_with_huge_pages()

# pylint: disable=g-import-not-at-top,wrong-import-position
import copy
import dataclasses
import functools
import json
import sys
from typing import Any, Callable, Sequence

from absl import flags
from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections
from ml_collections import config_flags

from vgg_jax import architectures
from vgg_jax import cli
from vgg_jax import distributed
from vgg_jax import evaluate
from vgg_jax import paths
from vgg_jax import train
from vgg_jax.configs import base

MANIFEST = 'recipe.json'
MARKER = 'recipe_done.json'
RESULTS = 'results.md'
FINISHED = ('done', 'plateau')
ConfigOverrides = Callable[[ml_collections.ConfigDict], Any]

# The paper's ILSVRC-2012 validation errors (top-1, top-5 %), keyed by
# (net, stage, protocol, multi-scale test): Tables 3, 4 and 5.
PAPER_ERRORS = {
    ('vgg11', 's256', 'dense', False): (29.6, 10.4),
    ('vgg11_lrn', 's256', 'dense', False): (29.7, 10.5),
    ('vgg13', 's256', 'dense', False): (28.7, 9.9),
    ('vgg16_c', 's256', 'dense', False): (28.1, 9.4),
    ('vgg16_c', 's384', 'dense', False): (28.1, 9.3),
    ('vgg16_c', 'jitter', 'dense', False): (27.3, 8.8),
    ('vgg16', 's256', 'dense', False): (27.0, 8.8),
    ('vgg16', 's384', 'dense', False): (26.8, 8.7),
    ('vgg16', 'jitter', 'dense', False): (25.6, 8.1),
    ('vgg19', 's256', 'dense', False): (27.3, 9.0),
    ('vgg19', 's384', 'dense', False): (26.9, 8.7),
    ('vgg19', 'jitter', 'dense', False): (25.5, 8.0),
    ('vgg16', 's256', 'dense', True): (26.6, 8.6),
    ('vgg16', 'jitter', 'dense', True): (24.8, 7.5),
    ('vgg19', 'jitter', 'dense', True): (24.8, 7.5),
    ('vgg16', 'jitter', 'multi_crop', True): (24.6, 7.5),
    ('vgg19', 'jitter', 'multi_crop', True): (24.6, 7.4),
    ('vgg16', 'jitter', 'multi_crop_dense', True): (24.4, 7.2),
    ('vgg19', 'jitter', 'multi_crop_dense', True): (24.4, 7.1),
}


@dataclasses.dataclass(frozen=True)
class Step:
  """One training run of the chain.

  Attributes:
    net: the model name it trains.
    stage: its stage (``base.STAGES``).
    workdir: where it trains.
    parent: the run it is initialised from; None: its config's own init.
    parent_net: the model the parent holds.
  """
  net: str
  stage: str
  workdir: epath.Path
  parent: epath.Path | None = None
  parent_net: str | None = None

  @property
  def name(self) -> str:
    return self.workdir.name


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """One evaluation pass over a stage's run (several protocols share it).

  Attributes:
    step: the run evaluated.
    multi_scale: the paper's multi-scale test set instead of one scale.
    protocols: the protocols computed in the pass.
    table: the paper's table it stands beside.
  """
  step: Step
  multi_scale: bool
  protocols: tuple[str, ...]
  table: str

  @property
  def name(self) -> str:
    return f'{self.step.name}_{"multi" if self.multi_scale else "single"}'


def needs_net_a(net: str) -> bool:
  """Whether the paper initialises ``net``'s first stage from net A."""
  arch, batch_norm = architectures.parse_name(net)
  return not batch_norm and arch.config in ('B', 'C', 'D', 'E')


def plan(net: str, root: str) -> list[Step]:
  """The chain's runs in training order.

  Args:
    net: a model name.
    root: the directory holding one workdir per run.
  """
  root_path = paths.absolute(root)
  steps = []
  first_parent = None
  if needs_net_a(net):
    steps.append(Step('vgg11', 's256', root_path / 'vgg11'))
    first_parent = steps[0]
  for name in base.STAGES:
    # Net A's S=256 run is the first stage of its own chain.
    workdir = root_path / (net if (net, name) == ('vgg11', 's256')
                           else f'{net}_{name}')
    parent = steps[-1] if base.STAGES[name].parent else first_parent
    steps.append(Step(net, name, workdir, parent and parent.workdir,
                      parent and parent.net))
  return steps


def evaluations(steps: Sequence[Step]) -> list[Evaluation]:
  """The paper's tests of the chain's runs (Tables 3, 4 and 5)."""
  evals = [Evaluation(s, False, ('dense',), 'Table 3') for s in steps]
  by_stage = {s.stage: s for s in steps if s.net == steps[-1].net}
  evals.append(Evaluation(by_stage['s256'], True, ('dense',), 'Table 4'))
  evals.append(Evaluation(by_stage['jitter'], True,
                          ('dense', 'multi_crop', 'multi_crop_dense'),
                          'Tables 4, 5'))
  return evals


def stage_config(step: Step, base_config: ml_collections.ConfigDict | None,
                 overrides: ConfigOverrides | None
                 ) -> ml_collections.ConfigDict:
  """The run config of one step: base, stage, overrides, then its parent.

  Args:
    step: the run.
    base_config: the config the stages start from (copied); None:
      ``base.get_config()`` (the paper's ImageNet setup).
    overrides: called on the config after the stage is applied
      (``--config.field=value``).

  Raises:
    ValueError: the run would start from std 0.01 where the paper says it
      stalls (``architectures.check_initialisation``), or the overrides
      change the model name or ``train.init_from``.
  """
  config = (base.get_config() if base_config is None
            else copy.deepcopy(base_config))
  base.apply_stage(config, step.net, step.stage)
  chained = (config.model.name, config.train.init_from)
  if overrides is not None:
    overrides(config)
  if (config.model.name, config.train.init_from) != chained:
    raise ValueError('The recipe sets model.name (from --net) and '
                     'train.init_from (each stage\'s parent) itself; do not '
                     'override them.')
  config.train.init_from = str(step.parent) if step.parent else ''
  architectures.check_initialisation(config.model.name, config.model.init,
                                     config.train.init_from)
  return config


def is_finished(workdir: epath.Path) -> bool:
  """Whether the recipe marked the run finished (``done`` or ``plateau``)."""
  return (workdir / MARKER).exists()


def check_manifest(root: str, net: str, *, write: bool) -> None:
  """Refuses a root that holds another net's chain or was another root.

  Args:
    root: the chain's root.
    net: the net asked for.
    write: record ``net`` and ``root`` when there is no manifest yet.

  Raises:
    ValueError: the manifest names another net or another root.
  """
  root_path = paths.absolute(root)
  manifest = root_path / MANIFEST
  if manifest.exists():
    held = json.loads(manifest.read_text())
    if held.get('net') != net:
      raise ValueError(
          f'{root} holds the recipe of {held.get("net")!r} ({manifest}); '
          f'run {net!r} under another --root rather than mix their workdirs.')
    if held.get('root') != str(root_path):
      raise ValueError(
          f'{manifest} was written for root {held.get("root")!r}, not '
          f'{str(root_path)!r}: its runs initialise from workdirs there. '
          'Run from that root, or start a new one.')
  elif write and jax.process_index() == 0:
    root_path.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({'net': net, 'root': str(root_path)},
                                   indent=2))


def check_parent(step: Step) -> None:
  """Raises a ValueError unless the step's parent is a finished run of its net."""
  if step.parent is None:
    return
  marker = step.parent / MARKER
  if not marker.exists():
    raise ValueError(
        f'{step.name} initialises from {step.parent}, which has not '
        f'finished: it holds {_holds(step.parent)}. Finish it first (rerun '
        'the recipe).')
  held = json.loads(marker.read_text()).get('net')
  if held != step.parent_net:
    raise ValueError(
        f'{step.name} initialises from {step.parent}, which holds {held}, '
        f'not {step.parent_net}.')


def _holds(workdir: epath.Path) -> str:
  """What a workdir holds, in words, for error messages."""
  config_file = workdir / 'config.json'
  if not config_file.exists():
    return 'no run yet'
  config = json.loads(config_file.read_text())
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').glob('*')
                 if p.name.isdigit())
  where = f'checkpoint step {steps[-1]}' if steps else 'no checkpoint'
  return f'a {config["model"]["name"]} run at {where} with no {MARKER}'


def _sync(tag: str) -> None:
  """Waits for every process, so that all take the same skip decisions."""
  # Process 0 alone writes markers and results; the others read them.
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(tag)


def train_step(step: Step, config: ml_collections.ConfigDict) -> str:
  """Trains (or resumes) one run; marks it finished; returns how it stopped."""
  check_parent(step)
  logging.info('Recipe: training %s (%s, stage %s) in %s', step.name,
               step.net, step.stage, step.workdir)
  summary = train.train_and_evaluate(config, str(step.workdir))
  stopped = summary['stopped']
  if stopped in FINISHED and jax.process_index() == 0:
    record = {'net': step.net, 'stage': step.stage, 'stopped': stopped,
              'step': summary['step'], 'val_top1': summary.get('val_top1'),
              'val_top5': summary.get('val_top5')}
    (step.workdir / MARKER).write_text(json.dumps(record, indent=2))
  _sync(f'recipe_{step.name}')
  return stopped


def run_evaluation(ev: Evaluation, root: epath.Path,
                   overrides: ConfigOverrides | None) -> dict[str, Any]:
  """Evaluates once (``ROOT/eval/<name>.json``) and returns the results."""
  out = root / 'eval' / f'{ev.name}.json'
  if out.exists():
    return json.loads(out.read_text())
  member = evaluate.load_member(str(ev.step.workdir), config_overrides=overrides)
  scales = base.stage_scales(ev.step.stage,
                             int(member.config.input.crop_size))
  results = evaluate.evaluate(
      [member], protocols=ev.protocols,
      scales=scales.multi_scales if ev.multi_scale else (scales.test_scale,))
  train_scales = [int(member.config.input.scale_min),
                  int(member.config.input.scale_max)]
  kept = {p: {'train_scales': train_scales,
              **{k: r[k] for k in ('top1_error', 'top5_error', 'scales',
                                   'num_examples', 'split', 'dataset',
                                   'steps')}}
          for p, r in results.items()}
  if jax.process_index() == 0:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(kept, indent=2))
  _sync(f'recipe_eval_{ev.name}')  # every process then sees the file
  return kept


def _paper(step: Step, protocol: str, multi_scale: bool) -> str:
  errors = PAPER_ERRORS.get((step.net, step.stage, protocol, multi_scale))
  return ' | '.join(f'{e:.1f}' for e in errors) if errors else 'n/a | n/a'


def results_table(net: str, root: str, results: Sequence[
    tuple[Evaluation, dict[str, Any]]]) -> str:
  """``results.md``: each evaluation beside the paper's number (error %)."""
  lines = [f'# The paper\'s recipe for {net}', '',
           f'Root `{root}`; errors in % on the evaluation split, the paper\'s '
           'on ILSVRC-2012 validation (n/a: no such row in the paper).', '',
           '| paper | run | stage | S | Q | protocol | top-1 | top-5 '
           '| paper top-1 | paper top-5 | examples |',
           '|---|---|---|---|---|---|---:|---:|---:|---:|---:|']
  for ev, by_protocol in results:
    for protocol, r in by_protocol.items():
      s_min, s_max = r['train_scales']
      train_scale = str(s_min) if s_min == s_max else f'[{s_min}, {s_max}]'
      lines.append(
          f'| {ev.table} | {ev.step.name} | {ev.step.stage} | {train_scale} '
          f'| {", ".join(str(q) for q in r["scales"])} | {protocol} '
          f'| {100 * r["top1_error"]:.2f} | {100 * r["top5_error"]:.2f} '
          f'| {_paper(ev.step, protocol, ev.multi_scale)} '
          f'| {r["num_examples"]} |')
  return '\n'.join(lines) + '\n'


def describe_plan(steps: Sequence[Step], evals: Sequence[Evaluation],
                  configs: Sequence[ml_collections.ConfigDict],
                  root: epath.Path) -> str:
  """The plan in words: runs, workdirs, parents, done or pending."""
  lines = []
  for i, (step, config) in enumerate(zip(steps, configs), 1):
    state = 'done' if is_finished(step.workdir) else (
        'resume' if (step.workdir / 'config.json').exists() else 'pending')
    scales = (config.input.scale_min, config.input.scale_max)
    lines.append(
        f'{i}. {step.name} [{state}] {step.net} stage {step.stage}: '
        f'S in [{scales[0]}, {scales[1]}], Q={config.input.eval_scales[0]}, '
        f'lr {config.train.learning_rate:g}, init '
        f'{config.train.init_from or config.model.init}; workdir '
        f'{step.workdir}')
  for ev in evals:
    done = (root / 'eval' / f'{ev.name}.json').exists()
    state = 'done' if done else 'pending'
    lines.append(f'eval {ev.name} [{state}]: {",".join(ev.protocols)} '
                 f'({ev.table})')
  lines.append(f'results: {root / RESULTS}')
  return '\n'.join(lines)


def run_recipe(net: str, root: str, *,
               base_config: ml_collections.ConfigDict | None = None,
               overrides: ConfigOverrides | None = None,
               dry_run: bool = False) -> dict[str, Any]:
  """Runs (or continues) the chain and its evaluations.

  Args:
    net: a model name (``vgg16``, ``vgg13_5x5``, ``vgg19_bn``, ...).
    root: local path or gs:// URL holding the chain's workdirs.
    base_config: the config every stage starts from; None: the paper's.
    overrides: applied to every stage's config and to the configs read back
      for evaluation (``--config.field=value``).
    dry_run: print the plan and run nothing.

  Returns:
    ``{'stopped': 'done' | 'preempted' | 'dry_run', 'plan': str}`` and, when
    done, ``'results'`` (the path of ``results.md``).
  """
  root_path = paths.absolute(root)
  check_manifest(root, net, write=not dry_run)
  steps = plan(net, root)
  configs = [stage_config(s, base_config, overrides) for s in steps]
  evals = evaluations(steps)
  text = describe_plan(steps, evals, configs, root_path)
  if jax.process_index() == 0:
    print(text)
  if dry_run:
    return {'stopped': 'dry_run', 'plan': text}
  for step, config in zip(steps, configs):
    if is_finished(step.workdir):
      logging.info('Recipe: %s finished, skipped.', step.name)
      continue
    stopped = train_step(step, config)
    if stopped not in FINISHED:
      print(f'{step.name} stopped ({stopped}); rerun the same command to '
            'continue.')
      return {'stopped': stopped, 'plan': text}
  results = [(ev, run_evaluation(ev, root_path, overrides)) for ev in evals]
  out = root_path / RESULTS
  if jax.process_index() == 0:
    out.write_text(results_table(net, str(root_path), results))
    print(out.read_text())
  return {'stopped': 'done', 'plan': text, 'results': str(out)}


def define_flags(flag_values: flags.FlagValues) -> None:
  """The flags of ``python -m vgg_jax.recipe``.

  Args:
    flag_values: where to register them.
  """
  flags.DEFINE_enum('net', None, list(architectures.MODEL_NAMES),
                    'The net whose chain to run.', flag_values=flag_values)
  flags.DEFINE_string('root', None, 'Directory (or gs:// URL) holding one '
                      'workdir per run, eval/ and results.md.',
                      flag_values=flag_values)
  flags.DEFINE_bool('dry_run', False, 'Print the plan; run nothing.',
                    flag_values=flag_values)
  # Read by config_flags like vgg_jax.main's --config (it looks for
  # --base_config.field overrides in the argv of definition time).
  config_flags.DEFINE_config_file(
      'base_config', None, 'Config file the stages start from (e.g. '
      'configs/quickstart.py for a small run; its crop size scales the '
      'stages\' S and Q); default: the paper\'s (vgg_jax/configs/base.py).',
      lock_config=False, sys_argv=list(sys.argv), flag_values=flag_values)
  flags.DEFINE_enum(
      'multiprocess', 'auto', ['auto', 'true', 'false'],
      'As for vgg_jax.main: call jax.distributed.initialize.',
      flag_values=flag_values)
  cli.define_config_overrides(flag_values)
  flags.mark_flags_as_required(['net', 'root'], flag_values=flag_values)


def main(flag_values: flags.FlagValues) -> int:
  """``python -m vgg_jax.recipe --net=NET --root=DIR``; returns the exit code.

  Args:
    flag_values: parsed ``define_flags`` flags.
  """
  logging.set_verbosity(logging.INFO)
  if not flag_values.dry_run:
    distributed.initialize(flag_values.multiprocess)
  overrides = functools.partial(cli.apply_config_overrides,
                                flag_values=flag_values)
  run_recipe(flag_values.net, flag_values.root,
             base_config=flag_values.base_config,
             overrides=overrides, dry_run=flag_values.dry_run)
  return 0


if __name__ == '__main__':
  cli.run(define_flags, main)
