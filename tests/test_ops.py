"""The CPU lowerings of vgg_jax.ops equal the default ops: values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export
from jax import lax

from vgg_jax import models
from vgg_jax import ops

NHWC = ('NHWC', 'HWIO', 'NHWC')


def _default_conv(x, w, padding, strides=(1, 1)):
  return lax.conv_general_dilated(x, w, strides, padding,
                                  dimension_numbers=NHWC)


def _ops_conv(x, w, padding, strides=(1, 1)):
  return ops.conv_general_dilated(x, w, strides, padding,
                                  dimension_numbers=NHWC)


def _value_and_grads(conv, x, w, dy, padding, strides=(1, 1)):
  """Output, dx and dW of ``conv`` (the VJP of a fixed cotangent)."""
  y, vjp = jax.vjp(lambda x_, w_: conv(x_, w_, padding, strides), x, w)
  return (y, *vjp(dy))


def _random(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape),
                     jnp.float32)


# (N, H, C_in, C_out, kernel, padding): one case per lowering of ops._plan
# and cpu_conv.
CONV_CASES = [
    (2, 2, 32, 16, 3, 'SAME'),  # 2x2 map: patches GEMM all three ways
    (2, 28, 64, 8, 3, 'SAME'),  # wide, large map: per-row GEMM kernel grad
    (2, 28, 64, 8, 3, ((0, 2), (1, 0))),  # the same, uneven padding
    (3, 8, 3, 8, 3, 'SAME'),  # first layer, XLA's own conv
    (2, 5, 20, 16, 3, 'SAME'),  # odd map, XLA's own conv
    (2, 7, 16, 32, 7, 'VALID'),  # FC-6 on a training crop: one matmul
    (2, 9, 16, 32, 7, 'VALID'),  # FC-6 scanning a larger image
    (2, 3, 16, 8, 1, 'VALID'),  # FC-7/FC-8: 1x1
    (2, 6, 16, 8, 3, ((0, 2), (1, 0))),  # explicit, uneven padding
]


@pytest.mark.parametrize('n,h,c,k,size,padding', CONV_CASES)
def test_cpu_conv_equals_the_default_conv(n, h, c, k, size, padding):
  x, w = _random((n, h, h, c), 0), _random((size, size, c, k), 1)
  y_shape = jax.eval_shape(lambda: _default_conv(x, w, padding)).shape
  dy = _random(y_shape, 2)
  want = jax.jit(_value_and_grads, static_argnums=(0, 4))(
      _default_conv, x, w, dy, padding)
  got = jax.jit(_value_and_grads, static_argnums=(0, 4))(
      _ops_conv, x, w, dy, padding)
  for name, a, b in zip(('output', 'dx', 'dW'), want, got):
    assert a.shape == b.shape and a.dtype == b.dtype, name
    # Only the summation order differs.
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(
        jnp.abs(a).max()), err_msg=name)


@pytest.mark.parametrize('n,h,c,k,size,padding', CONV_CASES[:2])
def test_cpu_conv_in_bfloat16_is_close_to_the_default(n, h, c, k, size,
                                                      padding):
  x = _random((n, h, h, c), 0).astype(jnp.bfloat16)
  w = (_random((size, size, c, k), 1) / 10).astype(jnp.bfloat16)
  y_shape = jax.eval_shape(lambda: _default_conv(x, w, padding)).shape
  dy = _random(y_shape, 2).astype(jnp.bfloat16)
  want = _value_and_grads(_default_conv, x, w, dy, padding)
  got = _value_and_grads(_ops_conv, x, w, dy, padding)
  for name, a, b in zip(('output', 'dx', 'dW'), want, got):
    assert b.dtype == jnp.bfloat16, name
    scale = float(jnp.abs(a.astype(jnp.float32)).max())
    np.testing.assert_allclose(b.astype(np.float32), a.astype(np.float32),
                               atol=0.03 * scale, err_msg=name)


@pytest.mark.parametrize('side,padding,strides', [
    (8, 'SAME', (2, 2)),  # strided
    (2, ((3, 3), (0, 4)), (1, 1)),  # padding wider than the kernel
])
def test_other_convs_are_left_to_xla(side, padding, strides):
  x, w = _random((2, side, side, 4), 0), _random((3, 3, 4, 8), 1)
  y_shape = jax.eval_shape(
      lambda: _default_conv(x, w, padding, strides)).shape
  dy = _random(y_shape, 2)
  want = _value_and_grads(_default_conv, x, w, dy, padding, strides)
  got = _value_and_grads(_ops_conv, x, w, dy, padding, strides)
  for a, b in zip(want, got):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('shape', [(3, 8, 6, 5), (2, 7, 5, 3)])
@pytest.mark.parametrize('ties', [False, True])
def test_cpu_max_pool_equals_reduce_window(shape, ties):
  x = _random(shape, 0)
  if ties:
    # Rounded values tie within windows: the whole gradient must go to the
    # first maximum in row-major order, as select_and_scatter does.
    x = jnp.round(x)
  dy = _random(jax.eval_shape(ops.max_pool_2x2_default, x).shape, 1)
  y0, vjp0 = jax.vjp(ops.max_pool_2x2_default, x)
  y1, vjp1 = jax.vjp(jax.jit(ops.max_pool_2x2), x)
  np.testing.assert_array_equal(y1, y0)
  np.testing.assert_array_equal(vjp1(dy)[0], vjp0(dy)[0])


@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
def test_accelerators_get_the_default_ops(platform):
  """Lowered for GPU/TPU, the program has XLA's conv and pool, no GEMMs."""
  x = jax.ShapeDtypeStruct((2, 2, 2, 4), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 3, 4, 8), jnp.float32)
  net = jax.jit(lambda x, w: ops.max_pool_2x2(_ops_conv(x, w, 'SAME')))
  text = export.export(net, platforms=[platform])(x, w).mlir_module()
  assert 'convolution' in text and 'reduce_window' in text
  assert 'dot_general' not in text
  cpu = export.export(net, platforms=['cpu'])(x, w).mlir_module()
  assert 'dot_general' in cpu and 'convolution' not in cpu


def _loss_and_grads(model, images, labels):
  """Cross-entropy and its parameter gradients, in training mode (BN)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p):
    logits = nnx.merge(graphdef, p, rest, copy=True)(images)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(labels)),
                                                labels])
  return jax.jit(jax.value_and_grad(loss))(params)


def test_vgg_training_loss_and_grads_equal_the_default_ops(monkeypatch):
  images = _random((4, 32, 32, 3), 0)
  labels = jnp.array([0, 1, 2, 3])
  kwargs = dict(num_classes=5, width_multiplier=1 / 8, fc6_kernel=1,
                dropout_rate=0.0, rngs=0)
  fast = models.create_model('vgg11_bn', **kwargs)
  fast_loss, fast_grads = _loss_and_grads(fast, images, labels)
  monkeypatch.setattr(ops, 'conv_general_dilated', lax.conv_general_dilated)
  monkeypatch.setattr(ops, 'max_pool_2x2', ops.max_pool_2x2_default)
  slow = models.create_model('vgg11_bn', **kwargs)
  slow_loss, slow_grads = _loss_and_grads(slow, images, labels)
  np.testing.assert_allclose(fast_loss, slow_loss, rtol=1e-6)
  # The biases before BN have zero gradient up to rounding, so the absolute
  # tolerance is set by the largest gradient of the net.
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(slow_grads))
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(
      slow_grads), jax.tree_util.tree_leaves_with_path(fast_grads)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))
