"""Ghost batch norm (Hoffer et al., 2017): statistics per virtual batch.

In training, each run of ``virtual_batch_size`` consecutive examples along
axis 0 is normalised with its own statistics, as if the batch were several
small ones; the running averages take the mean over the groups of their
statistics. These functions split a batch into groups (a leading group axis
of size ``G``), give per-feature values that axis, and average statistics
over it. With one group they leave their input as it is.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def num_groups(
  batch_size: int, feature_axes: tuple[int, ...], virtual_batch_size: int | None
) -> int:
  """The number ``G`` of virtual batches of ``virtual_batch_size`` examples in a batch.

  Returns:
    ``batch_size // virtual_batch_size``, or 1 when ``virtual_batch_size`` is None.

  Raises:
    ValueError: if axis 0 is a feature axis, or ``virtual_batch_size`` does
      not divide ``batch_size``.
  """
  if virtual_batch_size is None:
    return 1
  if 0 in feature_axes:
    raise ValueError(
      'virtual_batch_size splits axis 0, the batch, into groups, but axis 0 is a '
      f'feature axis here (feature axes {feature_axes}).'
    )
  if virtual_batch_size < 1 or batch_size % virtual_batch_size:
    raise ValueError(
      f'virtual_batch_size={virtual_batch_size} does not divide the batch of '
      f'{batch_size} examples: use a divisor of the batch size.'
    )
  return batch_size // virtual_batch_size


def split_batch(
  x: jax.Array, reduction_axes: tuple[int, ...], groups: int
) -> tuple[jax.Array, tuple[int, ...]]:
  """``x`` of shape (N, ...) as ``groups`` groups of consecutive examples.

  Returns:
    ``(xg, axes)``: ``xg`` of shape (G, N // G, ...), group ``g`` holding
    examples ``g * N // G`` to ``(g + 1) * N // G - 1``, and ``axes``, the
    ``reduction_axes`` of ``x`` as axes of ``xg`` (one to the right), so that
    reducing ``xg`` over them gives statistics of shape (G, *F). With one
    group, ``(x, reduction_axes)`` unchanged.
  """
  # Without groups the input keeps its rank: XLA:CPU runs the first layer's
  # fusions 2-4x slower with an extra leading axis.
  if groups == 1:
    return x, reduction_axes
  xg = x.reshape(groups, x.shape[0] // groups, *x.shape[1:])
  return xg, tuple(a + 1 for a in reduction_axes)


def with_group_axis(value: ArrayLike | None, groups: int) -> jax.Array | None:
  """A per-feature ``value`` of shape F as (1, *F) to broadcast against (G, *F).

  Explicitly, as no implicit rank promotion happens (which
  ``jax_numpy_rank_promotion='raise'`` rejects). With one group, or for
  None, ``value`` unchanged (as an array).
  """
  if value is None:
    return None
  return jnp.asarray(value)[None] if groups > 1 else jnp.asarray(value)


def mean_over_groups(stats: Any, groups: int) -> Any:
  """The mean over the leading group axis of each statistic: (G, *F) to F.

  ``stats`` is an array or a pytree of arrays (e.g. ``(mean, var)`` of the
  groups); with one group there is no group axis and ``stats`` is returned.
  """
  if groups == 1:
    return stats
  return jax.tree.map(lambda s: s.mean(0), stats)
