"""The train-step benchmark runs and compares with its peers (tiny sizes)."""

import pathlib
import re
import subprocess
import sys

import pytest

from benchmarks import machine
from benchmarks import peers

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_step_benchmark_prints_ratios_and_the_machine():
  run = subprocess.run(
      [sys.executable, 'benchmarks/train_step.py',
       '--config=configs/quickstart.py', '--width_multiplier=0.0625',
       '--batch_size=4', '--steps=1', '--warmup=0', '--matmul_size=64',
       '--peers=keras_off', '--load_retries=0'],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  out = run.stdout
  assert f'CPU: {machine.cpu_model()}' in out
  jax_row = re.search(r'^\| vgg_jax .*\| vgg11_bn \| 4 \|.*\| 1\.00x \|', out,
                      re.M)
  keras_row = re.search(r'^\| Keras .*\| vgg11_bn \| 4 \|.*\| (\d+\.\d+)x \|',
                        out, re.M)
  assert jax_row and keras_row, out
  assert float(keras_row.group(1)) > 0


def test_step_profile_lists_the_ops_the_step_spends_its_time_in():
  run = subprocess.run(
      [sys.executable, 'benchmarks/step_profile.py',
       '--config=configs/quickstart.py', '--width_multiplier=0.0625',
       '--batch_size=4', '--steps=2', '--warmup=0', '--top=5',
       '--load_retries=0'],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  out = run.stdout
  summed = re.search(r'XLA op time summed per step: (\d+\.\d+) ms', out)
  assert summed and float(summed.group(1)) > 0, out
  # Five op rows; the convolutions' with their shapes from the compiled HLO
  # (a while loop's tuple of shapes is left out).
  ops = re.findall(r'^\| (\S+) \| (\d+\.\d+) \| (.*) \|$', out, re.M)
  assert len(ops) == 5, out
  assert any(re.fullmatch(r'f32\[\S* <- f32\[.*', shapes)
             for _, _, shapes in ops)
  times = [float(t) for _, t, _ in ops]
  assert times == sorted(times, reverse=True) and times[0] > 0


def test_op_kinds_and_shapes_read_the_profile_and_hlo():
  from benchmarks import step_profile  # pylint: disable=g-import-not-at-top
  times = {'ynn_fusion.3': 5, 'ynn_fusion': 1, 'copy.12': 2, 'dot_general': 4}
  assert step_profile.op_kinds(times) == {'ynn_fusion': 6, 'copy': 2,
                                          'dot_general': 4}
  hlo = ('  %p.1 = f32[8,4]{1,0} parameter(0)\n'
         '  %w = f32[4,2]{1,0} parameter(1)\n'
         '  %dot.5 = f32[8,2]{1,0} dot(%p.1, %w), lhs_contracting_dims={1}\n')
  assert step_profile.op_shapes(hlo, 'dot.5') == (
      'f32[8,2]{1,0} <- f32[8,4]{1,0}, f32[4,2]{1,0}')
  assert step_profile.op_shapes(hlo, 'missing') == ''


def test_bad_peer_is_one_clear_error():
  run = subprocess.run(
      [sys.executable, 'benchmarks/train_step.py', '--peers=caffe'],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 2
  assert '--peers: unknown caffe' in run.stderr


@pytest.mark.skipif(not peers.torch_available(),
                    reason='PyTorch (the bench extra) is not installed')
def test_torch_twin_has_the_parameter_count_of_the_jax_net():
  from vgg_jax import models
  spec = peers.NetSpec(name='vgg11_bn', image_size=32, batch_size=2,
                       num_classes=10, width_multiplier=0.125,
                       dropout_rate=0.5, learning_rate=0.01, momentum=0.9,
                       weight_decay=5e-4)
  twin = peers.torch_vgg(spec)
  model = models.create_model('vgg11_bn', num_classes=10,
                              width_multiplier=0.125, fc6_kernel=1)
  assert sum(p.numel() for p in twin.parameters()) == models.count_params(
      model)
