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
