"""The transfer experiment (``vgg_jax.transfer``) at the tiny budget."""

import json

import pytest

from vgg_jax import checkpointing
from vgg_jax import transfer


def test_transfer_runs_every_method_and_resumes(tiny_config, tmp_path):
  out, root = tmp_path / 'out', tmp_path / 'runs'
  results = transfer.run_transfer(tiny_config, str(out), str(root),
                                  budget='tiny')
  assert set(results) == {'budget', 'pretrain', *transfer.METHODS}
  for name in ('pretrain', *transfer.METHODS):
    assert 0.0 <= results[name]['top1'] <= results[name]['top5'] <= 1.0
  # Trained on classes 5-9 only: 5 outputs, and the fine-tunes copied the
  # pre-trained trunk (frozen: it stayed as it was).
  config = json.loads((root / 'frozen_trunk' / 'config.json').read_text())
  assert config['data']['classes'] == [5, 6, 7, 8, 9]
  assert config['train']['init_from'] == str(root / 'pretrain')
  table = (out / 'results.md').read_text()
  assert 'conv trunk frozen' in table and 'from scratch' in table
  # A rerun finds everything recorded and trains nothing.
  steps_before = checkpointing.steps_on_disk(str(root / 'full'))
  again = transfer.run_transfer(tiny_config, str(out), str(root),
                                budget='tiny')
  assert again == results
  assert checkpointing.steps_on_disk(str(root / 'full')) == steps_before


def test_transfer_refuses_another_budget_in_the_same_out(tiny_config,
                                                          tmp_path):
  (tmp_path / 'results.json').write_text('{"budget": "full"}')
  with pytest.raises(ValueError, match="holds a 'full' run"):
    transfer.run_transfer(tiny_config, str(tmp_path), str(tmp_path / 'r'),
                          budget='tiny')


def test_the_configs_differ_only_where_the_methods_do(tiny_config, tmp_path):
  budget = transfer.BUDGETS['full']
  configs = {m: transfer.transfer_config(m, tiny_config, budget, tmp_path)
             for m in ('pretrain', 'frozen_trunk', 'full', 'scratch')}
  assert configs['pretrain'].data.classes == (0, 1, 2, 3, 4)
  assert configs['scratch'].data.classes == (5, 6, 7, 8, 9)
  assert configs['scratch'].train.init_from == ''
  assert configs['frozen_trunk'].train.freeze == 'trunk'
  assert configs['full'].train.freeze == 'none'
  assert {c.train.max_steps for m, c in configs.items()
          if m != 'pretrain'} == {budget.transfer_steps}
  assert tiny_config.data.classes == ()  # the base is left as it was
