"""Precise batch-norm statistics: population averages instead of lagging EMAs.

With a high learning rate the running averages of batch norm trail the
weights, and inference-mode accuracy jumps from epoch to epoch. Recomputing
them with the final weights fixes that ("precise BN": Wu & Johnson, 2021;
fvcore, detectron2 and pycls do it before evaluation): run the model in
training mode over N training examples, without updating the weights, and set
each BN layer's mean and var to the *equal-weight average of its batch
statistics* over those batches (as PyTorch's ``momentum=None`` would).

`precise_batch_stats` does it for a Flax linen model (functionally, on its
``batch_stats``), `precise_batch_stats_nnx` for a Flax NNX model (in place).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from jaxbn._layers import LINEN_BATCH_NORMS, NNX_BATCH_NORMS, in_training
from jaxbn._nnx_intercept import intercept_calls
from jaxbn._running import unbiased_variance
from jaxbn.statistics import Axes, batch_statistics, canonicalize_axes, value_count

Stats = dict[str, jax.Array]


def input_statistics(h: jax.Array, axis: Axes, unbiased: bool) -> Stats:
  """``{'mean', 'var'}`` of ``h`` per feature (``axis``), as precise statistics take them.

  Two-pass, in float32 or wider; the variance is biased unless ``unbiased``
  (for layers with ``unbiased_running_var=True``). Shapes: the feature axes'.
  """
  h = jnp.asarray(h)
  feature_axes = canonicalize_axes(h.ndim, axis)
  reduction_axes = tuple(a for a in range(h.ndim) if a not in feature_axes)
  mean, var = batch_statistics(
    h.astype(jnp.promote_types(h.dtype, jnp.float32)), reduction_axes, use_fast_variance=False
  )
  if unbiased:
    var = unbiased_variance(var, value_count(h, reduction_axes))
  return {'mean': mean, 'var': var}


def layer_batch_statistics(
  apply_fn: Callable[..., Any], variables: Any, x: jax.Array, **kwargs
) -> dict[tuple[str, ...], Stats]:
  """The batch mean and variance that each BN layer computes on ``x``.

  Runs ``apply_fn(variables, x, mutable=['batch_stats'], **kwargs)`` (pass
  the arguments that put the model in training mode, e.g. ``train=True``) and
  records, for every `jaxbn.BatchNorm` and `flax.linen.BatchNorm` called in
  training mode, `input_statistics` of its input. The variance is biased
  unless the layer stores unbiased running variances
  (``unbiased_running_var=True``).

  Returns:
    ``{module path: {'mean': (F,), 'var': (F,)}}``.
  """
  stats = {}

  def record(next_fun, args, call_kwargs, context):
    module = context.module
    if (
      context.method_name == '__call__'
      and isinstance(module, LINEN_BATCH_NORMS)
      and in_training(module, args, call_kwargs)
    ):
      unbiased = getattr(module, 'unbiased_running_var', False)
      stats[module.path] = input_statistics(args[0], module.axis, unbiased)
    return next_fun(*args, **call_kwargs)

  with nn.intercept_methods(record):
    apply_fn(variables, x, mutable=['batch_stats'], **kwargs)
  return stats


def _average(per_batch: Callable[[jax.Array], Any], images: jax.Array, batch_size: int) -> Any:
  """The mean over the full batches of ``images`` of the pytree ``per_batch(batch)``."""
  num_batches = len(images) // batch_size
  if num_batches < 1:
    raise ValueError(f'precise statistics need at least one batch of {batch_size} examples.')
  # One jitted forward per batch: on XLA:CPU this is faster than a lax.scan.
  total = per_batch(images[:batch_size])
  for i in range(1, num_batches):
    total = jax.tree.map(jnp.add, total, per_batch(images[i * batch_size : (i + 1) * batch_size]))
  return jax.tree.map(lambda t: t / num_batches, total)


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
  variables = {'params': params, 'batch_stats': batch_stats}
  stats_of = jax.jit(functools.partial(layer_batch_statistics, apply_fn, **kwargs))
  flat = traverse_util.flatten_dict(batch_stats)
  for path, layer in _average(lambda x: stats_of(variables, x), images, batch_size).items():
    for name, value in layer.items():
      flat[(*path, name)] = value.astype(flat[(*path, name)].dtype)
  return traverse_util.unflatten_dict(flat)


def _nnx_statistics(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array, **kwargs) -> list:
  """`input_statistics` of each BN layer of the merged model in training mode, else None.

  One entry per layer of `nnx.iter_modules` that is a `jaxbn.nnx.BatchNorm`
  or `flax.nnx.BatchNorm`, in its order; the model (a copy) is called as
  ``model(x, **kwargs)`` after ``model.train()``.
  """
  model = nnx.merge(graphdef, state)
  model.train()
  index = {id(m): i for i, m in enumerate(_nnx_batch_norms(model).values())}
  stats = [None] * len(index)

  def record(call, bn, args, call_kwargs):
    if id(bn) in index and in_training(bn, args, call_kwargs):
      if stats[index[id(bn)]] is not None:
        raise ValueError('precise statistics: a BN layer is called twice in training mode.')
      unbiased = getattr(bn, 'unbiased_running_var', False)
      stats[index[id(bn)]] = input_statistics(args[0], bn.axis, unbiased)
    return call(*args, **call_kwargs)

  with intercept_calls(NNX_BATCH_NORMS, record):
    model(x, **kwargs)
  return stats


def _nnx_batch_norms(model: nnx.Module) -> dict[tuple, nnx.Module]:
  """``{path: layer}`` of the `jaxbn.nnx.BatchNorm` and `flax.nnx.BatchNorm` layers of ``model``."""
  return {path: m for path, m in nnx.iter_modules(model) if isinstance(m, NNX_BATCH_NORMS)}


def layer_batch_statistics_nnx(model: nnx.Module, x: jax.Array, **kwargs) -> dict[tuple, Stats]:
  """`layer_batch_statistics` of a Flax NNX model: each BN layer's statistics on ``x``.

  Calls a copy of ``model`` in training mode (``model.train()``) as
  ``model(x, **kwargs)``; ``model`` and its state stay as they are.

  Returns:
    ``{layer path: {'mean': (F,), 'var': (F,)}}`` for every `jaxbn.nnx.BatchNorm`
    and `flax.nnx.BatchNorm` called in training mode, paths as `nnx.iter_modules`'.
  """
  stats = _nnx_statistics(*nnx.split(model), x, **kwargs)
  return {p: s for p, s in zip(_nnx_batch_norms(model), stats, strict=True) if s is not None}


def precise_batch_stats_nnx(
  model: nnx.Module, images: jax.Array, batch_size: int, **kwargs
) -> None:
  """Sets each BN layer's ``mean`` and ``var`` of an NNX ``model`` to its precise statistics.

  In place, as NNX updates state: the mean over the ``len(images) //
  batch_size`` full batches of each layer's batch statistics, with the
  weights of ``model`` (as `precise_batch_stats`; the same numbers for the
  same weights). Other state (parameters, ``count``, the mode set by
  ``model.train()`` / ``model.eval()``) is kept. ``**kwargs`` go to each call
  ``model(batch, **kwargs)``, made in training mode on a copy.
  """
  graphdef, state = nnx.split(model)
  stats_of = jax.jit(functools.partial(_nnx_statistics, graphdef, **kwargs))
  average = _average(lambda x: stats_of(state, x), images, batch_size)
  for bn, stats in zip(_nnx_batch_norms(model).values(), average, strict=True):
    for name, value in (stats or {}).items():
      variable = getattr(bn, name)
      variable[...] = value.reshape(variable.shape).astype(variable.dtype)
