"""The small-scale study of the paper's claims (vgg_jax.study)."""

import json
import statistics

from etils import epath
import pytest

from vgg_jax import architectures
from vgg_jax import cli
from vgg_jax import study
from vgg_jax import study_report
from vgg_jax import train


def test_cells_are_unique_ordered_and_cover_every_claim():
  cells = study.cells()
  names = [c.name for c in cells]
  assert len(names) == len(set(names))
  for i, cell in enumerate(cells):
    if cell.parent:
      assert cell.parent in names[:i]  # parents train first
  prefixes = {n.rsplit('_s', 1)[0] for n in names}
  for claim in study_report.CLAIMS:
    for row in claim.rows:
      assert row.prefix in prefixes, row
  # Two seeds where the paper's differences are small.
  for prefix in ('A', 'A_LRN', 'C', 'D', 'E', 'D_jitter', 'D_from_A'):
    assert {f'{prefix}_s0', f'{prefix}_s1'} <= set(names)


def test_cell_configs_follow_the_papers_scales_and_inits(tmp_path):
  budget = study.BUDGETS['full']
  configs = {c.name: study.cell_config(c, budget, workdir_root=tmp_path,
                                       data_dir=None, manual_dir=None)
             for c in study.cells()}
  for config in configs.values():
    # No cell starts where the paper says a net stalls.
    architectures.check_initialisation(config.model.name, config.model.init,
                                       config.train.init_from)
    assert config.input.crop_size == 32 and config.model.fc6_kernel == 1
    assert config.model.width_multiplier == budget.width_multiplier
    assert config.train.learning_rate == 1e-2
    assert config.train.num_epochs == 2.0 and config.train.max_steps == -1
  jitter = configs['D_jitter_s1']
  assert (jitter.input.scale_min, jitter.input.scale_max) == (37, 73)
  assert tuple(jitter.input.eval_scales) == (55,) and jitter.seed == 1
  assert configs['D_S55_s0'].input.scale_min == 55
  from_a = configs['D_from_A_s1']
  assert from_a.model.init == 'normal'  # Sec. 3.1: the rest std 0.01
  assert from_a.train.init_from == str(tmp_path / 'A_s1')
  assert configs['B_5x5_s0'].model.name == 'vgg13_5x5'
  assert configs['D_glorot_s0'].model.init == 'glorot'  # the footnote
  assert configs['E_s1'].model.init == 'he'
  assert configs['A_s0'].train.step_boundaries_epochs == pytest.approx(
      (1.2, 1.7))


def _record(prefix_errors, test='single', protocol='center_crop', n=10000):
  return {name: {'budget': 'full', 'train_seconds': 60.0, 'eval_seconds': 6.0,
                 'tests': {test: {protocol: {'top1_error': err / 100,
                                             'num_examples': n}}}}
          for name, err in prefix_errors.items()}


@pytest.mark.parametrize('errors, outcome', [
    ({'B_s0': 10.0, 'B_s1': 10.2, 'B_5x5_s0': 13.0}, 'reproduced'),
    ({'B_s0': 13.0, 'B_s1': 13.2, 'B_5x5_s0': 10.0}, 'not reproduced'),
    ({'B_s0': 10.0, 'B_s1': 10.6, 'B_5x5_s0': 10.4}, 'not distinguishable')])
def test_verdicts_weigh_the_difference_against_the_noise(errors, outcome):
  results = _record(errors)
  claim = next(c for c in study_report.CLAIMS if 'shallow' in c.title)
  seed_std = study_report.pooled_seed_std(results)
  # The one-seed row takes the spread of B's two seeds.
  assert seed_std == pytest.approx(
      statistics.stdev([errors['B_s0'], errors['B_s1']]))
  text = '\n'.join(study_report.claim_markdown(claim, results, seed_std))
  assert f'**Verdict: {outcome} at this scale.**' in text
  assert '| B | center_crop, 10000 images | ' in text


def test_on_par_claims_hold_when_the_difference_is_noise():
  results = _record({'A_s0': 10.0, 'A_s1': 10.4, 'A_LRN_s0': 10.1,
                     'A_LRN_s1': 10.3})
  claim = study_report.CLAIMS[0]  # LRN does not help
  text = '\n'.join(study_report.claim_markdown(claim, results, 0.2))
  assert '**Verdict: reproduced at this scale.**' in text
  results['A_LRN_s0']['tests']['single']['center_crop']['top1_error'] = 0.05
  results['A_LRN_s1']['tests']['single']['center_crop']['top1_error'] = 0.05
  text = '\n'.join(study_report.claim_markdown(claim, results, 0.2))
  assert '**Verdict: not reproduced at this scale.**' in text


def test_report_writes_the_table_and_the_plot(tmp_path):
  results = _record({'B_s0': 10.0, 'B_s1': 10.2, 'B_5x5_s0': 13.0})
  study_report.write_report(results, epath.Path(tmp_path), num_cells=18)
  text = (tmp_path / 'results.md').read_text()
  assert '3 of 18 cells' in text and '### B vs shallow 5x5' in text
  assert '### C (1x1) vs D (3x3)' not in text  # its cells have not run
  # The summary: one line for the one claim whose cells ran.
  summary = [l for l in text.splitlines() if l.startswith('| B vs shallow')]
  assert len(summary) == 1 and 'B-5x5 13.0 (B + 7); B 10.1 (B)' in summary[0]
  assert summary[0].endswith('| reproduced at this scale |')
  assert not any(l.startswith('| C (1x1)') for l in text.splitlines())
  assert (tmp_path / 'study.png').read_bytes()[:4] == b'\x89PNG'


def test_unknown_cells_and_budgets_are_refused(tmp_path, capsys):
  status = cli.call(study.define_flags, study.main,
                    ['--cells=A_s0,Z_s9', f'--out={tmp_path}', '--dry_run'])
  assert status == 1
  assert 'Unknown cell(s) Z_s9' in capsys.readouterr().err
  with pytest.raises(ValueError, match='Unknown budget'):
    study.run_study(str(tmp_path), str(tmp_path), budget='huge')


@pytest.mark.slow
def test_tiny_study_runs_and_resumes_cell_by_cell(fashion_idx_dir, tfds_dir,
                                                   tmp_path, monkeypatch):
  out, root = tmp_path / 'out', tmp_path / 'work'
  args = ['--budget=tiny', f'--out={out}', f'--workdir_root={root}',
          f'--data_dir={tfds_dir}', f'--manual_dir={fashion_idx_dir}']
  # A child before its parent has run is refused.
  assert cli.call(study.define_flags, study.main,
                  args + ['--cells=D_from_A_s0']) == 1
  assert cli.call(study.define_flags, study.main,
                  args + ['--cells=A_s0']) == 0
  first = json.loads((out / 'results.json').read_text())
  assert list(first) == ['A_s0']

  trained = []
  real = train.train_and_evaluate

  def spy(config, workdir):
    trained.append(epath.Path(workdir).name)
    return real(config, workdir)
  monkeypatch.setattr(train, 'train_and_evaluate', spy)
  assert cli.call(study.define_flags, study.main,
                  args + ['--cells=A_s0,D_from_A_s0']) == 0
  assert trained == ['D_from_A_s0']  # A_s0 was recorded: not retrained
  results = json.loads((out / 'results.json').read_text())
  assert results['A_s0'] == first['A_s0']
  cell = results['D_from_A_s0']
  assert cell['steps'] == 2 and cell['cell']['parent'] == 'A_s0'
  single = cell['tests']['single']
  assert set(single) == {'center_crop'}
  assert single['center_crop']['scales'] == [37]
  assert single['center_crop']['num_examples'] == 40
  text = (out / 'results.md').read_text()
  assert '### Init: net A vs Glorot' not in text  # D (Glorot) not run
  assert (out / 'study.png').exists()
