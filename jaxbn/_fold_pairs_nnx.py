"""Which BN layers of a Flax NNX model can be folded: `jaxbn._fold_pairs` for NNX.

The same rules as for linen (see `jaxbn._fold_pairs`), for ``nnx.Linear``,
``nnx.Conv`` and ``nnx.ConvTranspose`` (and the types given to `jaxbn.folding.register_linear`)
followed by `jaxbn.nnx.BatchNorm` or ``flax.nnx.BatchNorm`` (exact types).
Their calls are seen through `jaxbn._nnx_intercept` while one inference call
of a copy of the model (in ``eval()`` mode) is traced; layers are named by
their `nnx.iter_modules` paths.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from jaxbn._fold_pairs import (
  CannotFold,
  FoldPlan,
  Path,
  Trace,
  layer_name,
  plan,
  refuse_training,
  split_call,
  used_elsewhere,
)
from jaxbn._layers import NNX_BATCH_NORMS, NNX_LINEAR
from jaxbn._nnx_intercept import intercept_calls

_NOT_LINEAR = (
  'its input is not the very output of a Linear, Conv or ConvTranspose layer (e.g. an '
  'activation, a reshape or the model input comes between)'
)


def _features(layer: nnx.Module, path: Path) -> int:
  """1: the output features are the last axis.

  Raises:
    CannotFold: if ``layer`` has a transposed kernel (not supported).
  """
  if getattr(layer, 'transpose_kernel', False):
    raise CannotFold(f'{layer_name(path)} has transpose_kernel=True (not supported)')
  return 1


def _apply(graphdef: nnx.GraphDef, intercept: Callable, state: nnx.State, *args, **kwargs) -> Any:
  """A copy of the model in ``eval()`` mode called on ``args``, its layers' calls intercepted.

  ``intercept(path, call, layer, args, kwargs)`` replaces each call of a
  linear or BN layer at ``path``; ``call(*args, **kwargs)`` runs it.
  """
  model = nnx.merge(graphdef, state)
  model.eval()
  paths = {id(layer): path for path, layer in nnx.iter_modules(model)}

  def by_path(call, layer, call_args, call_kwargs):
    path = paths.get(id(layer))
    if path is None or type(layer) not in (*NNX_LINEAR, *NNX_BATCH_NORMS):
      return call(*call_args, **call_kwargs)
    return intercept(path, call, layer, call_args, call_kwargs)

  with intercept_calls((*NNX_LINEAR, *NNX_BATCH_NORMS), by_path):
    return model(*args, **kwargs)


def _record(trace: Trace, path: Path, call: Callable, layer: Any, args: tuple, kwargs: dict):
  """Calls ``layer`` and records the call in ``trace``; refuses a BN layer in training mode."""
  linear = type(layer) in NNX_LINEAR
  if not linear:
    refuse_training(path, layer, args, kwargs)
  out = call(*args, **kwargs)
  if linear:
    trace.linear(path, layer, out)
  else:
    trace.bn(path, layer, args[0], out)
  return out


def find_pairs_nnx(model: nnx.Module, args: tuple, kwargs: dict) -> FoldPlan:
  """The foldable BN layers of ``model(*args, **kwargs)`` in ``eval()`` mode.

  Traced abstractly on a copy: ``model`` is not changed, no arithmetic runs.

  Raises:
    ValueError: if a BN layer is called in training mode.
  """
  graphdef, state = nnx.split(model)
  trace = Trace(_features, _NOT_LINEAR)
  fn, arrays = split_call(
    functools.partial(_apply, graphdef, functools.partial(_record, trace)), args, kwargs
  )
  jax.eval_shape(fn, state, arrays)
  trace.outputs.clear()  # tracers, not to be kept past their trace
  pairs = trace.checked_pairs()

  def probe_fn(inputs, probe):
    intercept = lambda path, call, layer, a, k: probe.intercept(path, call, a, k)
    probed, _ = split_call(functools.partial(_apply, graphdef, intercept), args, kwargs)
    return probed(*inputs)

  return plan(trace, pairs, used_elsewhere(probe_fn, (state, arrays), trace, pairs))
