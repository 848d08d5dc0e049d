"""Batch renormalization (Ioffe, 2017): the r, d correction and its clipping schedule.

In training, batch renormalization normalises with the batch statistics
``mu_B, sigma_B`` and then corrects towards the running ``mu, sigma``::

    y = scale * ((x - mu_B) / sigma_B * r + d) + bias

with ``r, d`` from `renorm_correction` treated as constants (no gradient).
``(rmax, dmax) = (1, 0)`` gives ``r = 1, d = 0``, plain batch norm;
`renorm_schedule` widens the bounds during warm-up. `jaxbn.batch_norm` takes
the bounds as ``renorm_clip``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike


def renorm_correction(
  batch_mean: ArrayLike,
  batch_var: ArrayLike,
  mean: ArrayLike,
  var: ArrayLike,
  epsilon: ArrayLike,
  renorm_clip: tuple[ArrayLike, ArrayLike],
) -> tuple[jax.Array, jax.Array]:
  r"""Batch renormalization's ``r`` and ``d``, with gradients stopped.

  .. math::
    r = \mathrm{clip}\Big(\frac{\sigma_B}{\sigma}, \frac{1}{r_{max}}, r_{max}\Big),
    \qquad
    d = \mathrm{clip}\Big(\frac{\mu_B - \mu}{\sigma}, -d_{max}, d_{max}\Big),

  with :math:`\sigma_B = \sqrt{\sigma_B^2 + \epsilon}` from the batch and
  :math:`\mu, \sigma = \sqrt{\sigma^2 + \epsilon}` from the running averages.

  Args:
    batch_mean: the batch mean, shape ``F``.
    batch_var: the biased batch variance, shape ``F``.
    mean: the running mean, shape ``F``.
    var: the running variance, shape ``F``.
    epsilon: added to both variances before the square root.
    renorm_clip: ``(rmax, dmax)``, with ``rmax >= 1`` and ``dmax >= 0``
      (possibly traced, e.g. from `renorm_schedule`).

  Returns:
    ``(r, d)``, each of shape ``F``.

  Example:
    >>> r, d = renorm_correction(jnp.array([2.0]), jnp.array([4.0]), jnp.array([0.0]),
    ...                          jnp.array([1.0]), 0.0, (1.5, 1.0))
    >>> r, d  # sigma_B / sigma = 2 and (mu_B - mu) / sigma = 2, both clipped
    (Array([1.5], dtype=float32), Array([1.], dtype=float32))
  """
  rmax, dmax = renorm_clip
  running_std = jnp.sqrt(var + epsilon)
  r = jnp.clip(jnp.sqrt(batch_var + epsilon) / running_std, 1.0 / rmax, rmax)
  d = jnp.clip((batch_mean - mean) / running_std, -dmax, dmax)
  return lax.stop_gradient(r), lax.stop_gradient(d)


def renorm_schedule(
  step: ArrayLike, rmax: float, dmax: float, warmup_steps: int
) -> tuple[jax.Array, jax.Array]:
  """Batch renormalization's clipping bounds, widened linearly during warm-up.

  ``(1, 0)`` (plain batch norm) at step 0, growing linearly to
  ``(rmax, dmax)`` at ``warmup_steps`` and constant after (Ioffe, 2017,
  relaxes them gradually in the same way).

  Args:
    step: the number of training steps taken (may be traced).
    rmax: the final bound of ``r``, at least 1.
    dmax: the final bound of ``|d|``, at least 0.
    warmup_steps: steps to reach them; 0 gives them from the start.

  Returns:
    ``(rmax_t, dmax_t)``, float32 scalars for `jaxbn.batch_norm`'s ``renorm_clip``.

  Example:
    >>> renorm_schedule(50, rmax=3.0, dmax=5.0, warmup_steps=100)
    (Array(2., dtype=float32), Array(2.5, dtype=float32))
  """
  progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(warmup_steps, 1), 0.0, 1.0)
  return 1.0 + (rmax - 1.0) * progress, dmax * progress
