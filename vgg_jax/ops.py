"""VGG's max-pool and convolution, with faster lowerings on CPU.

XLA:CPU differentiates ``reduce_window`` max-pooling through
``select_and_scatter``, which it expands into index tensors and a scatter:
on the quickstart net that was about a quarter of the training step. The
2x2/2 pool of every VGG block is a plain reshape and maximum instead, with
a VJP that routes each gradient to the first maximum of its window in
row-major order, which is exactly what ``select_and_scatter`` does, so the
values and gradients are identical (``tests/test_ops.py``).

``conv_general_dilated`` (what ``models`` hands to ``nnx.Conv``) writes the
stride-1 convolutions of VGG as XLA:CPU runs them fastest: FC layers on a
training crop as the matrix products they are, kernel gradients of wide
layers on large maps as one GEMM per kernel row, and convolutions on maps
of a few pixels as patches times kernel; the rest stays XLA's own. The
values and gradients equal XLA's up to the order of summation.

Each op is picked at lowering time by ``jax.lax.platform_dependent``: the
CPU lowering is compiled only for CPU, and GPU/TPU programs contain the
default ops unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def max_pool_2x2_default(x: jax.Array) -> jax.Array:
  """2x2 max-pool, stride 2, VALID (NHWC) through ``reduce_window``."""
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                           'VALID')


def _windows(x: jax.Array) -> jax.Array:
  """``(N, H, W, C)`` -> ``(N, H/2, W/2, C, 4)``, VALID (odd edges dropped)."""
  n, h, w, c = x.shape
  x = x[:, :h - h % 2, :w - w % 2, :]
  x = x.reshape(n, h // 2, 2, w // 2, 2, c)
  return x.transpose(0, 1, 3, 5, 2, 4).reshape(n, h // 2, w // 2, c, 4)


@jax.custom_vjp
def max_pool_2x2_reshape(x: jax.Array) -> jax.Array:
  """2x2 max-pool, stride 2, VALID (NHWC) as a reshape and a maximum."""
  n, h, w, c = x.shape
  x = x[:, :h - h % 2, :w - w % 2, :].reshape(n, h // 2, 2, w // 2, 2, c)
  return jnp.max(x, axis=(2, 4))


def _pool_fwd(x):
  y = max_pool_2x2_reshape(x)
  return y, (x, y)


def _pool_bwd(res, g):
  x, y = res
  n, h, w, c = x.shape
  win = _windows(x)
  # The first maximum of each window (row-major) takes the whole gradient,
  # as select_and_scatter with a `>=` select does.
  taken = jnp.zeros(y.shape, bool)
  parts = []
  for k in range(4):
    hit = (win[..., k] == y) & ~taken
    taken = taken | hit
    parts.append(jnp.where(hit, g, jnp.zeros_like(g)))
  dx = jnp.stack(parts, -1).reshape(n, h // 2, w // 2, c, 2, 2)
  dx = dx.transpose(0, 1, 4, 2, 5, 3).reshape(n, h - h % 2, w - w % 2, c)
  if h % 2 or w % 2:
    dx = jnp.pad(dx, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
  return (dx,)


max_pool_2x2_reshape.defvjp(_pool_fwd, _pool_bwd)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """VGG's 2x2/2 max-pool (NHWC, VALID); the reshape lowering on CPU."""
  return lax.platform_dependent(x, cpu=max_pool_2x2_reshape,
                                default=max_pool_2x2_default)


# Maps of at most this many pixels take the patches + GEMM lowering forward
# and for the input gradient: XLA:CPU's own kernels for the 2x2 maps of a
# 32-pixel crop ran 6x slower (BENCHMARKS.md, "Where the CPU time went").
SMALL_MAP_PIXELS = 4
# Layers whose kernel gradient is one GEMM per kernel row: XLA:CPU's own
# ran up to 3.2x slower on VGG's wide, large maps (8x112x112x64 -> 128),
# but faster on narrow or small ones, so only from both of these up.
GEMM_DW_MIN_CHANNELS = 64
GEMM_DW_MIN_PIXELS = 28 * 28

_NHWC = ('NHWC', 'HWIO', 'NHWC')
Pads = tuple[tuple[int, int], tuple[int, int]]


def _explicit_pads(padding, kernel_hw: tuple[int, int]) -> Pads | None:
  """``padding`` as ((lo, hi), (lo, hi)), or None if not stride-1 SAME/VALID."""
  if padding == 'VALID':
    return ((0, 0), (0, 0))
  if padding == 'SAME':
    return tuple(((k - 1) // 2, k // 2) for k in kernel_hw)
  if isinstance(padding, (tuple, list)) and len(padding) == 2:
    return tuple((int(lo), int(hi)) for lo, hi in padding)
  return None


def _xla_conv(x: jax.Array, w: jax.Array, pads: Pads) -> jax.Array:
  return lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=_NHWC)


def _patches(x: jax.Array, kernel_hw: tuple[int, int], pads: Pads
             ) -> jax.Array:
  """``(N, H', W', kh * kw * C)``: each output pixel's receptive field."""
  kh, kw = kernel_hw
  x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  return jnp.concatenate([x[:, i:i + oh, j:j + ow, :]
                          for i in range(kh) for j in range(kw)], axis=-1)


def _gemm_conv(x: jax.Array, w: jax.Array, pads: Pads) -> jax.Array:
  """The convolution as patches @ kernel (HWIO flattened)."""
  p = _patches(x, w.shape[:2], pads)
  return jnp.dot(p, w.reshape(-1, w.shape[-1]),
                 preferred_element_type=x.dtype)


def _gemm_dx(dy: jax.Array, w: jax.Array, pads: Pads) -> jax.Array:
  """Input gradient: dy correlated with the flipped, transposed kernel."""
  kh, kw = w.shape[:2]
  full = ((kh - 1 - pads[0][0], kh - 1 - pads[0][1]),
          (kw - 1 - pads[1][0], kw - 1 - pads[1][1]))
  return _gemm_conv(dy, jnp.flip(w, (0, 1)).swapaxes(2, 3), full)


def _gemm_dw(x: jax.Array, dy: jax.Array, kernel_hw: tuple[int, int],
             pads: Pads) -> jax.Array:
  """Kernel gradient, one GEMM per kernel row.

  The input's ``kw`` column shifts side by side (``kw * C`` channels) make
  each kernel row's gradient one ``(kw * C, N * H' * W') @ dy`` product:
  ``kh`` GEMMs instead of one per tap, and ``kh`` slices of the padded input
  instead of ``kh * kw``: 2-5% off VGG-A's and VGG-D's step (BENCHMARKS.md).
  """
  kh, kw = kernel_hw
  c = x.shape[-1]
  x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  oh, ow = dy.shape[1], dy.shape[2]
  columns = jnp.concatenate([x[:, :, j:j + ow, :] for j in range(kw)], -1)
  dy = dy.reshape(-1, dy.shape[-1])
  rows = [lax.dot_general(columns[:, i:i + oh].reshape(-1, kw * c), dy,
                          (((0,), (0,)), ((), ())),
                          preferred_element_type=x.dtype)
          for i in range(kh)]
  return jnp.stack(rows).reshape(kh, kw, c, dy.shape[-1])


def _plan(x_shape, w_shape) -> tuple[bool, bool, bool]:
  """Which of forward, dx, dW take the GEMM lowering (see the constants)."""
  pixels = x_shape[1] * x_shape[2]
  small = pixels <= SMALL_MAP_PIXELS
  return small, small, (w_shape[2] >= GEMM_DW_MIN_CHANNELS
                        and pixels >= GEMM_DW_MIN_PIXELS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cpu_spatial_conv(x: jax.Array, w: jax.Array, pads: Pads) -> jax.Array:
  if _plan(x.shape, w.shape)[0]:
    return _gemm_conv(x, w, pads)
  return _xla_conv(x, w, pads)


def _spatial_fwd(x, w, pads):
  return _cpu_spatial_conv(x, w, pads), (x, w)


def _spatial_bwd(pads, res, dy):
  x, w = res
  _, gemm_dx, gemm_dw = _plan(x.shape, w.shape)
  if gemm_dx:
    dx = _gemm_dx(dy, w, pads)
  else:
    dx = jax.vjp(lambda x_: _xla_conv(x_, w, pads), x)[1](dy)[0]
  if gemm_dw:
    dw = _gemm_dw(x, dy, w.shape[:2], pads)
  else:
    dw = jax.vjp(lambda w_: _xla_conv(x, w_, pads), w)[1](dy)[0]
  return dx.astype(x.dtype), dw.astype(w.dtype)


_cpu_spatial_conv.defvjp(_spatial_fwd, _spatial_bwd)


def cpu_conv(x: jax.Array, w: jax.Array, pads: Pads) -> jax.Array:
  """Stride-1 NHWC/HWIO convolution as XLA:CPU runs it fastest.

  A 1x1 kernel, or a VALID kernel as large as its input (FC-6 on a training
  crop), is a matrix product and is written as one, so autodiff yields
  GEMMs (XLA:CPU ran FC-6's input gradient as a convolution 25x slower);
  other kernels go through ``_cpu_spatial_conv``.
  """
  kh, kw = w.shape[:2]
  n, h, wd, c = x.shape
  if pads == ((0, 0), (0, 0)) and (h, wd) == (kh, kw):
    y = jnp.dot(x.reshape(n, h * wd * c), w.reshape(-1, w.shape[-1]),
                preferred_element_type=x.dtype)
    return y.reshape(n, 1, 1, -1)
  if (kh, kw) == (1, 1) and pads == ((0, 0), (0, 0)):
    return jnp.dot(x, w[0, 0], preferred_element_type=x.dtype)
  return _cpu_spatial_conv(x, w, pads)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, precision=None, **kwargs):
  """``lax.conv_general_dilated`` with ``cpu_conv`` for VGG's convs on CPU.

  A drop-in for ``nnx.Conv(conv_general_dilated=...)``: stride-1, undilated,
  ungrouped NHWC/HWIO convolutions in the default precision take
  ``cpu_conv`` on CPU; everything else, and every other backend, is
  ``lax.conv_general_dilated`` itself.
  """
  default = functools.partial(
      lax.conv_general_dilated, window_strides=window_strides,
      padding=padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, precision=precision, **kwargs)
  pads = _explicit_pads(padding, rhs.shape[:2])
  simple = (lhs.ndim == 4 and pads is not None
            and all(0 <= p <= k - 1 for (lo, hi), k in zip(pads, rhs.shape)
                    for p in (lo, hi))
            and all(s == 1 for s in window_strides)
            and all(d == 1 for d in (lhs_dilation or (1, 1)))
            and all(d == 1 for d in (rhs_dilation or (1, 1)))
            and feature_group_count == 1 and precision is None
            and not any(v is not None for v in kwargs.values())
            and _is_nhwc(dimension_numbers, lhs.ndim))
  if not simple:
    return default(lhs, rhs)
  return lax.platform_dependent(
      lhs, rhs, cpu=lambda x, w: cpu_conv(x, w, pads), default=default)


def _is_nhwc(dimension_numbers, ndim: int) -> bool:
  dn = lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim,
                                  dimension_numbers or _NHWC)
  return dn == lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, _NHWC)
