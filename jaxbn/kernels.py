"""Fast XLA:CPU forms of LeNet's convolution and max-pool, drop-in for the Flax layers.

`banded_conv_general_dilated`, given to ``nn.Conv`` or ``nnx.Conv`` as their
``conv_general_dilated``, computes their VALID convolutions as banded matrix
products (`conv_valid`), and `max_pool_2x2` the values of ``nn.max_pool(x,
(2, 2), strides=(2, 2))``; their derivatives are the same up to float rounding.
XLA:CPU runs them several times faster than its convolutions with few
channels (in the forward and both backward directions) and than the
select-and-scatter that differentiates ``lax.reduce_window``. On GPUs and TPUs
the standard layers are the fast ones: `jaxbn.models.LeNet` picks these only
on CPU (``conv_impl='auto'``). tests/test_kernels.py checks them against the
standard layers.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _window_elements(x: jax.Array, axes: tuple[int, int]) -> tuple[list[jax.Array], list[int]]:
  """The four elements of each 2x2 window over the adjacent ``axes`` (h, h + 1) of ``x``.

  Returns them in the order (0, 0), (0, 1), (1, 0), (1, 1), each of the pooled
  shape, and the shape that splits each pooled axis into (size // 2, 2).
  """
  h = axes[0]
  split = [*x.shape[:h], x.shape[h] // 2, 2, x.shape[h + 1] // 2, 2, *x.shape[h + 2 :]]
  x = x.reshape(split)
  at = lambda a, b: (slice(None),) * (h + 1) + (a, slice(None), b)
  return [x[at(a, b)] for a in range(2) for b in range(2)], split


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool(x: jax.Array, axes: tuple[int, int]) -> jax.Array:
  q, _ = _window_elements(x, axes)
  return jnp.maximum(jnp.maximum(q[0], q[1]), jnp.maximum(q[2], q[3]))


def _max_pool_fwd(x, axes):
  return _max_pool(x, axes), x


def _max_pool_bwd(axes, x, g):
  # The max is recomputed from the saved input, so that the comparisons see
  # the values it was taken over. The four parts are placed by broadcasting:
  # with a stack of them (and the max saved from the forward pass), XLA:CPU
  # (jax 0.10.2, YNNPACK reduce fusions) computed wrong gradients under jit.
  q, split = _window_elements(x, axes)
  m = jnp.maximum(jnp.maximum(q[0], q[1]), jnp.maximum(q[2], q[3]))
  share = g / sum((qi == m).astype(g.dtype) for qi in q)
  up = lambda v: jnp.expand_dims(v, (axes[0] + 1, axes[0] + 3))
  return (jnp.where(x.reshape(split) == up(m), up(share), 0).reshape(x.shape),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool_2x2(x: jax.Array, axes: Sequence[int] = (1, 2)) -> jax.Array:
  """2x2 max-pooling with stride 2 over the adjacent ``axes`` of ``x`` (even sizes).

  ``axes=(1, 2)`` pools NHWC. Same values as ``nn.max_pool(x, (2, 2), (2, 2))``
  and the gradient of autodiff of a reshape and a max (the cotangent of a
  window is shared equally by its tied maxima), computed elementwise.
  """
  return _max_pool(x, tuple(axes))


def _largest_divisor(n: int, at_most: int) -> int:
  return max(d for d in range(1, at_most + 1) if n % d == 0)


def conv_valid(x: jax.Array, kernel: jax.Array, block: int = 4) -> jax.Array:
  """Stride-1 VALID convolution of NHWC ``x`` with an HWIO ``kernel``, as one matrix product.

  (N, H, W, I) and (kh, kw, I, O) give (N, H - kh + 1, W - kw + 1, O), the
  values of ``lax.conv_general_dilated``. Each run of ``block`` output pixels
  of a row (rounded down to a divisor of the output width) is the product of
  its (kh, block + kw - 1, I) input window with a banded matrix made of the
  kernel. Autodiff turns this into three matrix products (forward, input and
  kernel gradients), which XLA:CPU runs as fast inside a ``lax.scan`` as
  outside, where it leaves the backward passes' convolutions to a naive loop.
  """
  n, h, w, i = x.shape
  kh, kw, _, o = kernel.shape
  ho, wo = h - kh + 1, w - kw + 1
  block = _largest_divisor(wo, block)
  width = block + kw - 1
  # band[dj, v, u] = 1 where window column v feeds output column u through kernel column dj.
  band = np.stack([np.eye(width, block, -dj, dtype=np.float32) for dj in range(kw)])
  matrix = jnp.einsum('dvu,edio->eviuo', band.astype(kernel.dtype), kernel).reshape(
    kh * width * i, -1
  )
  windows = jnp.stack(
    [
      jnp.stack([x[:, di : di + ho, b * block : b * block + width] for di in range(kh)], axis=2)
      for b in range(wo // block)
    ],
    axis=2,
  )  # (n, ho, wo // block, kh, width, i)
  return (windows.reshape(-1, kh * width * i) @ matrix).reshape(n, ho, wo, o)


# lax.conv_general_dilated's dimension numbers for NHWC inputs and HWIO kernels,
# as nn.Conv and nnx.Conv pass them.
_NHWC = jax.lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def banded_conv_general_dilated(
  lhs: jax.Array,
  rhs: jax.Array,
  window_strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: Any = None,
  feature_group_count: int = 1,
  **kwargs,
) -> jax.Array:
  """``lax.conv_general_dilated`` with `conv_valid` for the convolutions it covers.

  A drop-in for the ``conv_general_dilated`` argument of ``nn.Conv`` and
  ``nnx.Conv``: stride-1, undilated, ungrouped VALID convolutions of NHWC
  inputs with HWIO kernels (LeNet's) are banded matrix products; any other
  goes to ``lax.conv_general_dilated`` unchanged.
  """
  ones = lambda v: v is None or all(d == 1 for d in v)
  valid = padding == 'VALID' or all(tuple(p) == (0, 0) for p in padding)
  if (
    lhs.ndim == 4
    and dimension_numbers == _NHWC
    and valid
    and ones(window_strides)
    and ones(lhs_dilation)
    and ones(rhs_dilation)
    and feature_group_count == 1
  ):
    return conv_valid(lhs, rhs)
  return jax.lax.conv_general_dilated(
    lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
    feature_group_count, **kwargs,
  )  # fmt: skip
