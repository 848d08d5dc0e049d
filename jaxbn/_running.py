"""Running averages of batch statistics: exponential, cumulative, and the unbiased variance.

What `jaxbn.batch_norm` does with a batch's statistics in training mode, as
functions of arrays (or of pytrees of arrays, leaf by leaf, e.g. the pair
``(mean, var)``). Momentum is the *decay*, as in Flax and D2L: 0.9 keeps 90%
of the old value (PyTorch's ``momentum=0.1``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def ema_update(running: Any, batch: Any, momentum: ArrayLike) -> Any:
  r"""Exponential moving average: the running statistics after one more batch.

  .. math::
    \mathrm{running} \leftarrow m \cdot \mathrm{running} + (1 - m) \cdot \mathrm{batch}

  Args:
    running: the running statistics, an array or a pytree of arrays (e.g.
      ``(mean, var)``, each of the feature shape ``F``).
    batch: this batch's statistics, of the same structure and shapes.
    momentum: the decay ``m`` in [0, 1]: 1 keeps ``running``, 0 replaces it
      by ``batch``.

  Returns:
    The new running statistics, of the structure of ``running``.

  Example:
    >>> ema_update(jnp.array([0.0, 10.0]), jnp.array([1.0, 0.0]), 0.75)
    Array([0.25, 7.5 ], dtype=float32)
  """
  return jax.tree.map(lambda r, b: momentum * r + (1.0 - momentum) * b, running, batch)


def cumulative_update(running: Any, batch: Any, count: ArrayLike) -> Any:
  r"""Equal-weight average of all batches: the running statistics after one more.

  .. math::
    \mathrm{running} \leftarrow \mathrm{running}
      + \frac{\mathrm{batch} - \mathrm{running}}{\mathrm{count} + 1}

  which is the plain mean of ``count + 1`` batches' statistics when
  ``running`` is the mean of the first ``count`` (PyTorch's
  ``momentum=None``). The caller increments ``count`` afterwards.

  Args:
    running: the running statistics, an array or a pytree of arrays.
    batch: this batch's statistics, of the same structure and shapes.
    count: the number of batches already averaged into ``running`` (0 for
      the first batch, whose statistics then replace ``running``).

  Returns:
    The new running statistics, of the structure of ``running``.

  Example:
    >>> cumulative_update(jnp.array([2.0]), jnp.array([5.0]), count=2)  # mean of 2, 2, 5
    Array([3.], dtype=float32)
  """

  # The weight in the statistics' own precision: float32 would round 1/3 in a
  # float64 model (PyTorch's cumulative average is exact there).
  def update(r, b):
    weight = 1.0 / (jnp.asarray(count, jnp.result_type(r, b, jnp.float32)) + 1.0)
    return r + weight * (b - r)

  return jax.tree.map(update, running, batch)


def unbiased_variance(var: ArrayLike, count: ArrayLike) -> jax.Array:
  r"""Bessel's correction: the unbiased variance from the biased one.

  .. math::
    \frac{n}{n - 1} \mathrm{var}
      = \frac{1}{n - 1} \sum_i (x_i - \bar x)^2

  PyTorch stores this in its running variance; `jaxbn.batch_norm` does with
  ``unbiased_running_var=True`` (it always normalises with the biased one).

  Args:
    var: biased variances ``mean((x - mean(x))**2)``, shape ``F``.
    count: ``n``, the number of values each was averaged over (scalar or
      shape ``F``, e.g. from `jaxbn.statistics.value_count` with a mask).

  Returns:
    ``var * n / (n - 1)``, shape ``F``; with ``n <= 1`` (the variance of one
    value or none, 0) ``var`` itself rather than a division by zero.

  Example:
    >>> unbiased_variance(jnp.array([1.0, 2.0]), 4.0)
    Array([1.3333334, 2.6666667], dtype=float32)
  """
  return var * count / jnp.maximum(count - 1, 1)
