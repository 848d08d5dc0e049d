"""Precise batch-norm statistics: population averages instead of lagging EMAs.

With a high learning rate the running averages of batch norm trail the
weights, and inference-mode accuracy jumps from epoch to epoch. Recomputing
them with the final weights fixes that ("precise BN": Wu & Johnson, 2021;
fvcore, detectron2 and pycls do it before evaluation): run the model in
training mode over N training examples, without updating the weights, and set
each BN layer's mean and var to the *equal-weight average of its batch
statistics* over those batches (as PyTorch's ``momentum=None`` would).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxbn.linen import BatchNorm
from jaxbn.running import unbiased_variance
from jaxbn.statistics import batch_statistics, canonicalize_axes, value_count

BATCH_NORMS = (BatchNorm, nn.BatchNorm)


def layer_batch_statistics(
  apply_fn: Callable[..., Any], variables: Any, x: jax.Array, **kwargs
) -> dict[tuple[str, ...], dict[str, jax.Array]]:
  """The batch mean and variance that each BN layer computes on ``x``.

  Runs ``apply_fn(variables, x, mutable=['batch_stats'], **kwargs)`` (pass
  the arguments that put the model in training mode, e.g. ``train=True``) and
  records, for every `jaxbn.BatchNorm` and `flax.linen.BatchNorm` called in
  training mode, the two-pass float32 statistics of its input over its
  reduction axes. The variance is biased unless the layer stores unbiased
  running variances (``unbiased_running_var=True``).

  Returns:
    ``{module path: {'mean': (F,), 'var': (F,)}}``.
  """
  stats = {}

  def record(next_fun, args, call_kwargs, context):
    module = context.module
    if (
      context.method_name == '__call__'
      and isinstance(module, BATCH_NORMS)
      and not nn.merge_param(
        'use_running_average',
        module.use_running_average,
        call_kwargs.get('use_running_average', args[1] if len(args) > 1 else None),
      )
    ):
      h = jnp.asarray(args[0])
      feature_axes = canonicalize_axes(h.ndim, module.axis)
      reduction_axes = tuple(a for a in range(h.ndim) if a not in feature_axes)
      mean, var = batch_statistics(
        h.astype(jnp.promote_types(h.dtype, jnp.float32)), reduction_axes, use_fast_variance=False
      )
      if getattr(module, 'unbiased_running_var', False):
        var = unbiased_variance(var, value_count(h, reduction_axes))
      stats[module.path] = {'mean': mean, 'var': var}
    return next_fun(*args, **call_kwargs)

  with nn.intercept_methods(record):
    apply_fn(variables, x, mutable=['batch_stats'], **kwargs)
  return stats


def precise_batch_stats(
  apply_fn: Callable[..., Any],
  params: Any,
  batch_stats: Any,
  images: jax.Array,
  batch_size: int,
  **kwargs,
) -> Any:
  """New ``batch_stats`` whose means and variances average the batch statistics.

  Args:
    apply_fn: the model's ``apply``.
    params: its parameters (not changed).
    batch_stats: its current ``batch_stats`` (gives the tree to fill).
    images: (N, ...) training inputs; ``N // batch_size`` full batches are used.
    batch_size: examples per batch (the training batch size, so that the
      statistics are those the layers normalise with in training).
    **kwargs: arguments putting the model in training mode, e.g. ``train=True``.

  Returns:
    ``batch_stats`` with every BN layer's ``mean`` and ``var`` replaced by the
    mean over batches of its batch statistics; other entries are kept.
  """
  num_batches = len(images) // batch_size
  if num_batches < 1:
    raise ValueError(f'precise statistics need at least one batch of {batch_size} examples.')
  variables = {'params': params, 'batch_stats': batch_stats}
  # One jitted forward per batch: on XLA:CPU this is faster than a lax.scan.
  per_batch = jax.jit(functools.partial(layer_batch_statistics, apply_fn, **kwargs))
  total = None
  for i in range(num_batches):
    stats = per_batch(variables, images[i * batch_size : (i + 1) * batch_size])
    total = stats if total is None else jax.tree.map(jnp.add, total, stats)
  flat = traverse_util.flatten_dict(batch_stats)
  for path, layer in total.items():
    for name, value in layer.items():
      flat[(*path, name)] = (value / num_batches).astype(flat[(*path, name)].dtype)
  return traverse_util.unflatten_dict(flat)
