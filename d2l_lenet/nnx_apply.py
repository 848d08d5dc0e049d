"""A Flax NNX model as a linen-style ``apply`` over variables held as nested dicts.

The trainer, its checkpoints and its data parallelism work on linen's form: a
pure ``apply_fn(variables, x, train=..., mutable=['batch_stats'])`` and
variables ``{'params': ..., 'batch_stats': ...}`` of nested dicts of arrays.
`as_apply` gives an NNX model that form (`nnx.split` once; `nnx.merge` in each
call, inside whatever transformation the caller applies), so one train step
serves both APIs; `as_module` turns such variables back into the NNX model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx


def as_apply(model: nnx.Module) -> tuple[Callable[..., Any], dict[str, Any]]:
  """``(apply_fn, variables)`` of ``model``, as linen's ``model.apply`` and ``init`` give them.

  ``variables`` holds the ``nnx.Param`` values under ``'params'`` and the
  ``nnx.BatchStat`` values under ``'batch_stats'``, as nested dicts keyed by
  attribute names. ``apply_fn(variables, *args, train, mutable=(), **kwargs)``
  calls the model in training (``model.train()``) or inference mode
  (``model.eval()``) and returns its output, and with ``mutable`` (e.g.
  ``['batch_stats']``) also ``{'batch_stats': the updated running averages}``.
  """
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

  def apply_fn(variables, *args, train: bool, mutable=(), **kwargs):
    model = _merged(graphdef, params, stats, variables)
    model.train() if train else model.eval()
    y = model(*args, **kwargs)
    if not mutable:
      return y
    return y, {'batch_stats': nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))}

  return apply_fn, {'params': nnx.to_pure_dict(params), 'batch_stats': nnx.to_pure_dict(stats)}


def _filled(template: nnx.State, values: dict) -> nnx.State:
  """A copy of ``template`` holding ``values`` (nested dicts); the template stays as it is."""
  state = jax.tree.map(lambda v: v, template)
  nnx.replace_by_pure_dict(state, values)
  return state


def _merged(graphdef, params: nnx.State, stats: nnx.State, variables: dict) -> nnx.Module:
  """The model of ``graphdef`` holding ``variables`` (``'params'``, ``'batch_stats'``)."""
  stats_values = variables.get('batch_stats') or {}
  return nnx.merge(graphdef, _filled(params, variables['params']), _filled(stats, stats_values))


def as_module(make_model: Callable[..., nnx.Module], variables: dict[str, Any]) -> nnx.Module:
  """The NNX model ``make_model(rngs=...)`` holding ``variables`` as `as_apply` gives them.

  Nothing is initialised (the model is built under `nnx.eval_shape`); its
  state must be ``nnx.Param`` and ``nnx.BatchStat`` only, as for `as_apply`.
  """
  abstract = nnx.eval_shape(lambda: make_model(rngs=nnx.Rngs(0)))
  return _merged(*nnx.split(abstract, nnx.Param, nnx.BatchStat), variables)
