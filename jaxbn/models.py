"""LeNet-5 with batch normalization, as in D2L's batch-norm chapter."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxbn.linen import BatchNorm

NORMS = ('jaxbn', 'flax', 'none')


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


def max_pool_2x2(x: jax.Array, axes: tuple[int, int] = (1, 2)) -> jax.Array:
  """2x2 max-pooling with stride 2 over the adjacent ``axes`` of ``x`` (even sizes).

  ``axes=(1, 2)`` pools NHWC, ``(2, 3)`` NCHW. Same values as
  ``nn.max_pool(x, (2, 2), (2, 2))`` and the same gradient as autodiff of a
  reshape and a max (the cotangent of a window is shared equally by its tied
  maxima), computed elementwise: XLA:CPU runs that much faster than the
  select-and-scatter of ``lax.reduce_window`` or the reductions over windows.
  """
  return _max_pool(x, tuple(axes))


def _largest_divisor(n: int, at_most: int) -> int:
  return max(d for d in range(1, at_most + 1) if n % d == 0)


def conv_valid(
  x: jax.Array, kernel: jax.Array, block: int = 4, channels_first: bool = False
) -> jax.Array:
  """Stride-1 VALID convolution of NHWC ``x`` with an HWIO ``kernel``, as one matrix product.

  (N, H, W, I) and (kh, kw, I, O) give (N, Ho, Wo, O), Ho = H - kh + 1 and
  Wo = W - kw + 1: the values of ``lax.conv_general_dilated`` (``nn.Conv``),
  or NCHW (N, O, Ho, Wo) with ``channels_first``. Each run of ``block``
  output pixels of a row (rounded down to a divisor of Wo) is the product of
  its (kh, block + kw - 1, I) input window with a banded matrix made of the
  kernel. Autodiff turns this into three matrix products (forward, input and
  kernel gradients), which XLA:CPU runs several times faster than its
  convolutions with few channels, and as fast inside a ``lax.scan``, where it
  leaves non-canonical convolutions (those of the backward pass) to a naive
  loop.
  """
  n, h, w, i = x.shape
  kh, kw, _, o = kernel.shape
  ho, wo = h - kh + 1, w - kw + 1
  block = _largest_divisor(wo, block)
  width = block + kw - 1
  # band[dj, v, u] = 1 where window column v feeds output column u through kernel column dj.
  band = np.stack([np.eye(width, block, -dj, dtype=np.float32) for dj in range(kw)])
  columns = 'eviou' if channels_first else 'eviuo'
  matrix = jnp.einsum(f'dvu,edio->{columns}', band, kernel).reshape(kh * width * i, -1)
  windows = jnp.stack(
    [
      jnp.stack([x[:, di : di + ho, b * block : b * block + width] for di in range(kh)], axis=2)
      for b in range(wo // block)
    ],
    axis=2,
  )  # (n, ho, wo // block, kh, width, i)
  y = windows.reshape(-1, kh * width * i) @ matrix
  if not channels_first:
    return y.reshape(n, ho, wo, o)
  # The blocks side by side along W. XLA:CPU keeps a concatenation along the
  # minor axis out of its consumers' fusions: the NCHW activations are written
  # once, instead of being re-gathered from the product by every consumer.
  y = y.reshape(n, ho, wo // block, o, block)
  return jnp.concatenate([jnp.transpose(y[:, :, b], (0, 2, 1, 3)) for b in range(wo // block)], -1)


class Conv(nn.Module):
  """A VALID 5x5 convolution with the parameters of ``nn.Conv``, computed by `conv_valid`.

  Parameters ``kernel`` (5, 5, I, O), Xavier-uniform, and ``bias`` (O,),
  zeros, as ``nn.Conv(features, (5, 5), padding='VALID', kernel_init=
  xavier_uniform())`` has them. Maps NHWC inputs to NHWC, or to NCHW with
  ``channels_first``.

  Attributes:
    features: output channels O.
    block: output pixels per row window of `conv_valid`.
    channels_first: return NCHW.
  """

  features: int
  block: int = 4
  channels_first: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
      'kernel', nn.initializers.xavier_uniform(), (5, 5, x.shape[-1], self.features)
    )
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    y = conv_valid(x, kernel, self.block, self.channels_first)
    return y + bias.reshape((1, -1, 1, 1) if self.channels_first else (1, 1, 1, -1))


class LeNet(nn.Module):
  """D2L's LeNet with an optional batch norm after each hidden layer.

  conv 6@5x5 -> BN -> sigmoid -> max-pool 2; conv 16@5x5 -> BN -> sigmoid ->
  max-pool 2; dense 120 -> BN -> sigmoid; dense 84 -> BN -> sigmoid; dense 10.
  Weights are Xavier-uniform, as ``d2l.train_ch6`` initializes them.

  Attributes:
    norm: ``'jaxbn'`` (`jaxbn.BatchNorm`), ``'flax'`` (`flax.linen.BatchNorm`)
      or ``'none'`` (chapter 6's plain LeNet, same layers without BN).
    momentum: decay of the running averages (D2L: 0.9).
    epsilon: added to the variance (D2L: 1e-5).
    num_classes: size of the output layer.
    axis_name: named axis (e.g. ``'data'`` in `jaxbn.parallel`) over which the
      BN layers average their batch statistics (synchronized BN); None
      normalises each device's batch on its own.
    virtual_batch_size: ghost batch norm in the BN layers (jaxbn only).
    renorm_clip: ``(rmax, dmax)`` of batch renormalization (jaxbn only).
    renorm_warmup_steps: steps over which the renorm bounds widen.
  """

  norm: str = 'jaxbn'
  momentum: float = 0.9
  epsilon: float = 1e-5
  num_classes: int = 10
  axis_name: str | None = None
  virtual_batch_size: int | None = None
  renorm_clip: tuple[float, float] | None = None
  renorm_warmup_steps: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
    """Maps (N, 28, 28, 1) images to (N, num_classes) logits.

    ``train`` selects batch statistics (and their update in the mutable
    ``batch_stats`` collection) or the running averages. ``mask`` (N,) bool
    marks the real examples of a padded batch: only they enter the batch
    statistics.
    """
    if self.norm not in NORMS:
      raise ValueError(f'norm={self.norm!r} is not one of {NORMS}.')
    dense = functools.partial(nn.Dense, kernel_init=nn.initializers.xavier_uniform())

    def norm(h, axis=-1):
      if self.norm == 'none':
        return h
      options = {}
      if self.norm == 'jaxbn':
        module = BatchNorm
        options = dict(
          virtual_batch_size=self.virtual_batch_size,
          renorm_clip=self.renorm_clip,
          renorm_warmup_steps=self.renorm_warmup_steps,
        )
      elif self.virtual_batch_size or self.renorm_clip:
        raise ValueError("Ghost BN and batch renormalization need norm='jaxbn'.")
      else:
        module = nn.BatchNorm
      bn = module(
        use_running_average=not train,
        momentum=self.momentum,
        epsilon=self.epsilon,
        axis=axis,
        axis_name=self.axis_name,
        **options,
      )
      return bn(h, mask=None if mask is None else mask.reshape(-1, *[1] * (h.ndim - 1)))

    # The first layer runs in NCHW (N, 6, 24, 24): its batch-norm reductions,
    # sigmoid and pooling then run along contiguous rows of 24 values.
    x = Conv(6, block=8, channels_first=True)(x)
    x = max_pool_2x2(nn.sigmoid(norm(x, axis=1)), axes=(2, 3))
    x = jnp.transpose(x, (0, 2, 3, 1))
    x = max_pool_2x2(nn.sigmoid(norm(Conv(16)(x))))
    x = x.reshape(x.shape[0], -1)
    x = nn.sigmoid(norm(dense(120)(x)))
    x = nn.sigmoid(norm(dense(84)(x)))
    return dense(self.num_classes)(x)


def create_model(name: str = 'lenet', **kwargs) -> nn.Module:
  """The model called ``name`` (only ``'lenet'`` for now) with its options."""
  models = {'lenet': LeNet}
  if name not in models:
    raise ValueError(f'model={name!r} is unknown: choose one of {sorted(models)}.')
  return models[name](**kwargs)


def first_norm_params(params) -> dict[str, jax.Array] | None:
  """gamma and beta of the first BN layer (as the chapter prints them), or None."""
  name = 'BatchNorm_0'
  if name not in params:
    return None
  return {'gamma': jnp.ravel(params[name]['scale']), 'beta': jnp.ravel(params[name]['bias'])}
