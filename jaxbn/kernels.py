"""Fast XLA:CPU forms of LeNet's convolution and max-pool, drop-in for the Flax layers.

`BandedConv` has the parameters and values of ``nn.Conv(features, kernel_size,
padding='VALID')`` and `max_pool_2x2` the values of ``nn.max_pool(x, (2, 2),
strides=(2, 2))``; their derivatives are the same up to float rounding.
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
from flax import linen as nn
from flax.linen.dtypes import promote_dtype
from flax.typing import Initializer


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


class BandedConv(nn.Module):
  """``nn.Conv(features, kernel_size, padding='VALID')``, computed by `conv_valid`.

  The same parameters (``kernel`` (kh, kw, I, O), ``bias`` (O,)) and values;
  NHWC in and out.

  Attributes:
    features: output channels O.
    kernel_size: (kh, kw).
    use_bias: add a learned per-channel bias.
    kernel_init: initializer of ``kernel``.
    bias_init: initializer of ``bias``.
    dtype: the computation dtype (None: that of the input and parameters).
    block: output pixels per row window of `conv_valid`.
  """

  features: int
  kernel_size: Sequence[int]
  padding: str = 'VALID'
  use_bias: bool = True
  dtype: Any = None
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros
  block: int = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.padding != 'VALID':
      raise ValueError(f"BandedConv computes padding='VALID' only, got {self.padding!r}.")
    kernel = self.param('kernel', self.kernel_init, (*self.kernel_size, x.shape[-1], self.features))
    bias = self.param('bias', self.bias_init, (self.features,)) if self.use_bias else None
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = conv_valid(x, kernel, self.block)
    return y if bias is None else y + bias.reshape(1, 1, 1, -1)
