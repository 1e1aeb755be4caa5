"""The same VGG trained by Keras 3 (TensorFlow) and by PyTorch, for comparison.

Each twin has the convolutions, batch norm, pooling, FC layers and dropout of
the ``vgg_jax`` net it stands beside (the same parameter count), and trains
with the same loss and SGD (momentum, L2 weight decay added to the gradient).
Their input is a float32 batch already normalised; ``vgg_jax`` normalises its
uint8 batch inside the step, so the comparison does not favour it. Each
framework uses its own best-known CPU practice: Keras ``train_on_batch``
(XLA ``jit_compile`` off and on), PyTorch eager with ``channels_last``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from typing import Any, Callable

import numpy as np

from vgg_jax import models


@dataclasses.dataclass(frozen=True)
class NetSpec:
  """What a twin must match, and the training hyperparameters."""
  name: str
  image_size: int
  batch_size: int
  num_classes: int
  width_multiplier: float
  dropout_rate: float
  learning_rate: float
  momentum: float
  weight_decay: float
  seed: int = 0

  def scaled(self, width: int) -> int:
    return max(1, int(round(width * self.width_multiplier)))


def torch_available() -> bool:
  """Whether PyTorch is installed (the optional ``bench`` extra)."""
  return importlib.util.find_spec('torch') is not None


def keras_vgg(spec: NetSpec):
  """The Keras twin (``keras.applications.VGG16`` for full-width VGG-D)."""
  import keras  # pylint: disable=g-import-not-at-top
  arch, batch_norm = models.parse_name(spec.name)
  if arch.lrn:
    raise ValueError(f'No Keras twin for {spec.name}: LRN.')
  shape = (spec.image_size, spec.image_size, 3)
  layers = [keras.Input(shape)]
  for block in arch.blocks:
    for w, k in block:
      if batch_norm:
        layers += [keras.layers.Conv2D(spec.scaled(w), k, padding='same'),
                   keras.layers.BatchNormalization(momentum=0.9,
                                                   epsilon=1e-5),
                   keras.layers.ReLU()]
      else:
        layers.append(keras.layers.Conv2D(spec.scaled(w), k, padding='same',
                                          activation='relu'))
    layers.append(keras.layers.MaxPooling2D(2))
  fc = spec.scaled(models.FC_WIDTH)
  layers += [keras.layers.Flatten(),
             keras.layers.Dense(fc, activation='relu'),
             keras.layers.Dropout(spec.dropout_rate),
             keras.layers.Dense(fc, activation='relu'),
             keras.layers.Dropout(spec.dropout_rate),
             keras.layers.Dense(spec.num_classes)]
  return keras.Sequential(layers, name=spec.name)


def keras_step(spec: NetSpec, jit_compile: bool
               ) -> tuple[Callable[[], None], int, str]:
  """``(step, parameter count, framework label)`` of the Keras twin."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(spec.seed)
  model = keras_vgg(spec)
  model.compile(
      optimizer=keras.optimizers.SGD(learning_rate=spec.learning_rate,
                                     momentum=spec.momentum,
                                     weight_decay=spec.weight_decay),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      jit_compile=jit_compile)
  x, y = _batch(spec)
  x, y = tf.constant(x), tf.constant(y)
  label = (f'Keras {keras.__version__} / TF {tf.__version__}, '
           f'jit_compile={"on" if jit_compile else "off"}')
  return (lambda: model.train_on_batch(x, y)), int(model.count_params()), label


def torch_vgg(spec: NetSpec):
  """The PyTorch twin: torchvision's VGG layout (FC layers as Linear)."""
  from torch import nn  # pylint: disable=g-import-not-at-top
  arch, batch_norm = models.parse_name(spec.name)
  layers, c = [], 3
  for b, block in enumerate(arch.blocks):
    for i, (w, k) in enumerate(block):
      layers.append(nn.Conv2d(c, spec.scaled(w), k, padding=k // 2))
      c = spec.scaled(w)
      if batch_norm:
        layers.append(nn.BatchNorm2d(c))
      layers.append(nn.ReLU(inplace=True))
      if arch.lrn and b == 0 and i == 0:
        # PyTorch divides alpha by the size; the paper's (AlexNet's) does not.
        layers.append(nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0))
    layers.append(nn.MaxPool2d(2))
  fc, side = spec.scaled(models.FC_WIDTH), spec.image_size // 32
  layers += [nn.Flatten(), nn.Linear(c * side * side, fc), nn.ReLU(True),
             nn.Dropout(spec.dropout_rate), nn.Linear(fc, fc), nn.ReLU(True),
             nn.Dropout(spec.dropout_rate), nn.Linear(fc, spec.num_classes)]
  return nn.Sequential(*layers)


def torch_step(spec: NetSpec) -> tuple[Callable[[], None], int, str]:
  """``(step, parameter count, framework label)`` of the PyTorch twin."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(spec.seed)
  model = torch_vgg(spec).to(memory_format=torch.channels_last).train()
  opt = torch.optim.SGD(model.parameters(), lr=spec.learning_rate,
                        momentum=spec.momentum,
                        weight_decay=spec.weight_decay)
  x, y = _batch(spec)
  x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(
      memory_format=torch.channels_last)
  y = torch.from_numpy(y).long()
  loss_fn = torch.nn.CrossEntropyLoss()

  def step() -> None:
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    if not np.isfinite(loss.item()):
      raise FloatingPointError(f'{spec.name} (PyTorch): non-finite loss.')
  params = sum(p.numel() for p in model.parameters())
  label = (f'PyTorch {torch.__version__} eager, channels_last, '
           f'{torch.get_num_threads()} threads')
  return step, params, label


def _batch(spec: NetSpec) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(spec.seed)
  size = (spec.batch_size, spec.image_size, spec.image_size, 3)
  return (rng.normal(0, 1, size).astype(np.float32),
          rng.integers(0, spec.num_classes, spec.batch_size, dtype=np.int32))


def bench_peer(make: Callable[[], tuple[Callable[[], None], int, str]],
               time_steps: Callable[..., list[float]], warmup: int,
               steps: int) -> dict[str, Any]:
  """Builds a twin's step, times its first call apart, then ``steps`` more.

  The first call traces (Keras) or allocates (PyTorch); it is reported as
  the compile time.
  """
  step, params, label = make()
  t0 = time.perf_counter()
  step()
  compile_s = time.perf_counter() - t0
  times = time_steps(step, max(0, warmup - 1), steps)
  return dict(framework=label, params=params, compile_s=compile_s,
              times=times)
