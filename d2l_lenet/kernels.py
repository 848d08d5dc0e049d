"""Fast XLA:CPU forms of LeNet's convolution and max-pool, drop-in for the Flax layers.

`BandedConv` and `NNXBandedConv`, in place of ``nn.Conv`` and ``nnx.Conv``,
compute their VALID convolutions as banded matrix products (`conv_valid`),
and `max_pool_2x2` the values of ``nn.max_pool(x, (2, 2), strides=(2, 2))``;
their derivatives are the same up to float rounding.
XLA:CPU runs them several times faster than its convolutions with few
channels (in the forward and both backward directions) and than the
select-and-scatter that differentiates ``lax.reduce_window``. On GPUs and TPUs
the standard layers are the fast ones: `d2l_lenet.models.LeNet` picks these only
on CPU (``conv_impl='auto'``). tests/test_kernels.py checks them against the
standard layers.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from d2l_lenet import divisors
from jaxbn import folding, statistics


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _windows(x: jax.Array, kh: int, kw: int, block: int) -> jax.Array:
  """(N, H, W, I) -> (N, H - kh + 1, Wo // block, kh, block + kw - 1, I): each output run's input.

  Wo = W - kw + 1 is a multiple of ``block``.
  """
  ho, wo, width = x.shape[1] - kh + 1, x.shape[2] - kw + 1, block + kw - 1
  return jnp.stack(
    [
      jnp.stack([x[:, di : di + ho, b * block : b * block + width] for di in range(kh)], axis=2)
      for b in range(wo // block)
    ],
    axis=2,
  )


def _windows_fwd(x, kh, kw, block):
  return _windows(x, kh, kw, block), None


def _windows_bwd(kh, kw, block, _, g):
  # The windows' cotangents summed back onto the input, rows (kh shifts) first,
  # then columns: as two passes XLA:CPU runs this about 1.3x faster than the
  # single fusion it makes of autodiff's transpose.
  runs, width = g.shape[2], g.shape[4]
  w = runs * block + kw - 1
  rows = sum(
    jnp.pad(g[:, :, :, di], ((0, 0), (di, kh - 1 - di), (0, 0), (0, 0), (0, 0))) for di in range(kh)
  )  # (n, h, runs, width, i)
  return (
    sum(
      jnp.pad(rows[:, :, b], ((0, 0), (0, 0), (b * block, w - b * block - width), (0, 0)))
      for b in range(runs)
    ),
  )


_windows.defvjp(_windows_fwd, _windows_bwd)


def conv_valid(
  x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *, block: int = 4
) -> jax.Array:
  """Stride-1 VALID convolution of NHWC ``x`` with an HWIO ``kernel``, as one matrix product.

  (N, H, W, I) and (kh, kw, I, O) give (N, H - kh + 1, W - kw + 1, O), the
  values of ``lax.conv_general_dilated``, plus ``bias`` (O,) if given. Each
  run of ``block`` output pixels of a row (rounded down to a divisor of the
  output width) is the product of its (kh, block + kw - 1, I) input window
  with a banded matrix made of the kernel. Autodiff turns this into three
  matrix products (forward, input and kernel gradients), which XLA:CPU runs as
  fast inside a ``lax.scan`` as outside, where it leaves the backward passes'
  convolutions to a naive loop. The bias is broadcast as
  `jaxbn.statistics.broadcast_features` does, so that its gradient is
  `feature_sum`'s fast sum over all but the channels.
  """
  n, h, w, i = x.shape
  kh, kw, _, o = kernel.shape
  ho, wo = h - kh + 1, w - kw + 1
  block = divisors.largest_divisor(wo, block)
  width = block + kw - 1
  # band[dj, v, u] = 1 where window column v feeds output column u through kernel column dj.
  band = np.stack([np.eye(width, block, -dj, dtype=np.float32) for dj in range(kw)])
  matrix = jnp.einsum('dvu,edio->eviuo', band.astype(kernel.dtype), kernel).reshape(
    kh * width * i, -1
  )
  windows = _windows(x, kh, kw, block).reshape(-1, kh * width * i)
  y = (windows @ matrix).reshape(n, ho, wo, o)
  if bias is None:
    return y
  return y + statistics.broadcast_features(bias, y.shape, (0, 1, 2))


def _check_covered(conv: nn.Conv | nnx.Conv, inputs: jax.Array) -> None:
  """Raises unless `conv_valid` computes ``conv`` (Flax's, linen or NNX) on ``inputs``."""
  ones = lambda v: v is None or bool(np.all(np.asarray(v) == 1))
  padding = conv.padding
  valid = padding == 'VALID' or (
    not isinstance(padding, (str, int)) and all(tuple(p) == (0, 0) for p in padding)
  )
  requirements = {
    'inputs of rank 4 (N, H, W, C)': inputs.ndim == 4,
    'a 2-D kernel_size': len(conv.kernel_size) == 2,
    "padding='VALID'": valid,
    'strides 1': ones(conv.strides),
    'input_dilation 1': ones(conv.input_dilation),
    'kernel_dilation 1': ones(conv.kernel_dilation),
    'feature_group_count=1': conv.feature_group_count == 1,
    'mask=None': conv.mask is None,
    'shared_weights=True': getattr(conv, 'shared_weights', True),
  }
  missing = [need for need, ok in requirements.items() if not ok]
  if missing:
    raise ValueError(
      f'{type(conv).__name__} computes only what kernels.conv_valid does; this call needs '
      f'{", ".join(missing)}. Use flax.linen.Conv or flax.nnx.Conv for it.'
    )


@folding.register_linear
class BandedConv(nn.Conv):
  """``flax.linen.Conv`` for stride-1 VALID 2-D convolutions, computed by `conv_valid`.

  The same variables, values and gradients as ``nn.Conv`` (up to float
  rounding); the bias is added inside `conv_valid`. Other convolutions
  (padding, strides, dilation, groups, masks) raise a ValueError. Registered
  with `jaxbn.folding.register_linear`, so that BN layers after it fold.
  """

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    _check_covered(self, inputs)
    kernel_shape = (*self.kernel_size, inputs.shape[-1], self.features)
    kernel = self.param('kernel', self.kernel_init, kernel_shape, self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype)
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    return conv_valid(inputs, kernel, bias)


@folding.register_linear
class NNXBandedConv(nnx.Conv):
  """`BandedConv` for Flax NNX: ``flax.nnx.Conv`` for stride-1 VALID 2-D convolutions."""

  def __call__(self, inputs: jax.Array) -> jax.Array:
    _check_covered(self, inputs)
    bias = None if self.bias is None else self.bias[...]
    inputs, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias), dtype=self.dtype)
    return conv_valid(inputs, kernel, bias)
