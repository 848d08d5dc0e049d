"""Which BN layers of a Flax linen model can be folded: found by tracing one inference call.

A BN layer (`jaxbn.BatchNorm` or `flax.linen.BatchNorm`) can be folded into a
linear layer when its input is the very array that layer returned (identity
of the traced value: anything applied in between makes a new array),
normalised along the layer's output features, and nothing else uses that
array, nor other calls of either layer. `find_pairs` traces the call
abstractly (no arithmetic runs) and says which layers pair up and why the
others cannot; `jaxbn.folding.fold` folds them.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import linen as nn
from flax import traverse_util
from flax.core import unfreeze
from jax.extend.core import Var

from jaxbn.linen import BatchNorm
from jaxbn.statistics import canonicalize_axes

# Exact types, not subclasses: a subclass may change what its call computes.
LINEAR_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.ConvTranspose)
BATCH_NORMS = (BatchNorm, nn.BatchNorm)
Path = tuple[str, ...]
_NOT_LINEAR = (
  'its input is not the very output of a Dense, DenseGeneral, Conv or ConvTranspose '
  'layer (e.g. an activation, a reshape or the model input comes between)'
)


def layer_name(path: Path) -> str:
  """A layer path as the errors name it, e.g. \'block1/bn\'."""
  return repr('/'.join(path)) if path else 'the model itself'


def _feature_ndim(bn: nn.Module, layer: nn.Module, x: jax.Array, out: jax.Array) -> int | str:
  """How many last axes of ``x`` (``layer``'s output) are features, or why ``bn`` cannot fold."""
  k = 1 if isinstance(layer.features, int) else len(layer.features)
  if getattr(layer, 'batch_dims', ()):
    return f'{layer_name(layer.path)} has batch_dims (not supported)'
  if getattr(layer, 'transpose_kernel', False):
    return f'{layer_name(layer.path)} has transpose_kernel=True (not supported)'
  if canonicalize_axes(x.ndim, bn.axis) != tuple(range(x.ndim - k, x.ndim)):
    return (
      f'its axis={bn.axis} is not the output-feature axis of {layer_name(layer.path)} (the last '
      f'{k} of {x.ndim} axes)'
    )
  if out.dtype != x.dtype:
    return f'it changes the dtype ({x.dtype} to {out.dtype}); folding would not'
  return k


def inference_mode(bn: nn.Module, args: tuple, kwargs: dict) -> bool:
  call = kwargs.get('use_running_average', args[1] if len(args) > 1 else None)
  return nn.merge_param('use_running_average', bn.use_running_average, call)


class _Pair(NamedTuple):
  linear: Path  # the linear layer whose output the BN layer receives
  features: tuple[int, ...]  # the feature shape F
  output: jax.ShapeDtypeStruct  # the linear layer's output


class _Trace:
  """Interceptor pairing each BN call with the linear layer whose output it receives.

  "Receives" is identity of the traced array: anything applied in between (an
  activation, a reshape, a residual sum) makes a new array, and no pair.
  """

  def __init__(self):
    self.calls = collections.Counter()  # path -> number of calls
    self.layers = {}  # path -> linear or BN module (for its attributes)
    self.outputs = {}  # id -> (linear path, its output, kept alive so that ids stay unique)
    self.pairs = {}  # BN path -> _Pair
    self.reasons = {}  # BN path -> why it cannot be folded

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__' or type(module) not in LINEAR_LAYERS + BATCH_NORMS:
      return next_fun(*args, **kwargs)
    path = module.path
    self.calls[path] += 1
    self.layers[path] = module
    if type(module) in LINEAR_LAYERS:
      out = next_fun(*args, **kwargs)
      self.outputs[id(out)] = (path, out)
      return out
    if not inference_mode(module, args, kwargs):
      raise ValueError(
        f'fold: BN layer {layer_name(path)} is in training mode (use_running_average=False) in '
        'the example call: pass the inference-mode arguments, e.g. train=False.'
      )
    x, out = args[0], next_fun(*args, **kwargs)
    linear, source = self.outputs.get(id(x), (None, None))
    k = _feature_ndim(module, self.layers[linear], x, out) if source is x else _NOT_LINEAR
    if isinstance(k, int) and any(p.linear == linear for p in self.pairs.values()):
      k = f'the output of {layer_name(linear)} also enters another BN layer'
    if isinstance(k, str):
      self.reasons[path] = k
    else:
      self.pairs[path] = _Pair(
        linear, x.shape[x.ndim - k :], jax.ShapeDtypeStruct(x.shape, x.dtype)
      )
    return out

  def checked_pairs(self, params: dict, stats: dict) -> dict[Path, Path]:
    """BN path -> linear path, for the pairs that one call each and the variables allow."""
    for bn, (linear, features, _) in self.pairs.items():
      shapes = [stats[(*bn, 'mean')].shape, params[(*linear, 'kernel')].shape[-len(features) :]]
      shapes += [params[(*linear, 'bias')].shape] if (*linear, 'bias') in params else []
      if self.calls[bn] > 1:
        self.reasons.setdefault(bn, f'it is called {self.calls[bn]} times')
      elif self.calls[linear] > 1:
        self.reasons[bn] = f'{layer_name(linear)} is called {self.calls[linear]} times'
      elif any(s != features for s in shapes):
        self.reasons[bn] = 'its variables are not those of one call (in an nn.scan or nn.vmap?)'
    return {bn: pair.linear for bn, pair in self.pairs.items() if bn not in self.reasons}


def _reaching(jaxpr, sources: list[Var]) -> set[int]:
  """Indices of the input variables ``sources`` of ``jaxpr`` that its outputs depend on.

  Each equation's outputs are taken to depend on all its inputs, also for calls
  of nested jaxprs: this may see a dependence that is not there (and refuse a
  safe fold), never miss one.
  """
  deps = {v: {i} for i, v in enumerate(sources)}
  union = lambda vs: set().union(*(deps.get(v, ()) for v in vs if isinstance(v, Var)))
  for eqn in jaxpr.eqns:
    if found := union(eqn.invars):
      deps.update((v, found) for v in eqn.outvars)
  return union(jaxpr.outvars)


def _used_elsewhere(fn: Callable, variables, arrays: list, trace: _Trace, pairs: dict) -> set:
  """The BN layers of ``pairs`` whose linear layer's output is also used by anything else.

  Traces ``fn`` again with each such output ``y`` replaced by ``y + d`` (``d``
  a zero input of its own) everywhere but at its BN layer: the model's outputs
  depend on ``d`` exactly when something else uses ``y``.
  """
  bns = list(pairs)
  index = {pairs[bn]: i for i, bn in enumerate(bns)}

  def probe(variables, arrays, deltas):
    clean = {}  # id(y + d) -> (y + d, y, linear path)

    def interceptor(next_fun, args, kwargs, context):
      path = context.module.path if context.method_name == '__call__' else None
      if path in index:
        y = next_fun(*args, **kwargs)
        raw = y + deltas[index[path]]
        clean[id(raw)] = (raw, y, path)
        return raw
      raw, y, linear = clean.get(id(args[0]) if args else None, (None, None, None))
      if path in pairs and raw is args[0] and linear == pairs[path]:
        args = (y, *args[1:])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      return fn(variables, arrays)

  if not bns:
    return set()
  deltas = [trace.pairs[bn].output for bn in bns]
  jaxpr = jax.make_jaxpr(probe)(variables, arrays, deltas).jaxpr
  return {bns[i] for i in _reaching(jaxpr, jaxpr.invars[-len(bns) :])}


def _split_call(model: nn.Module, args: tuple, kwargs: dict) -> tuple[Callable, list]:
  """``(fn, arrays)`` with ``fn(variables, arrays) = model.apply(variables, *args, **kwargs)``.

  ``arrays`` are the arrays among the arguments, so that tracing ``fn`` runs
  nothing on them; the other leaves (flags such as ``train``) stay static.
  """
  leaves, treedef = jax.tree.flatten((args, kwargs))
  traced = [isinstance(leaf, jax.Array | np.ndarray) for leaf in leaves]

  def fn(variables, arrays):
    it = iter(arrays)
    args, kwargs = treedef.unflatten(
      [next(it) if t else x for x, t in zip(leaves, traced, strict=True)]
    )
    return model.apply(variables, *args, **kwargs)

  return fn, [x for x, t in zip(leaves, traced, strict=True) if t]


class FoldPlan(NamedTuple):
  """What `find_pairs` found: which BN layer folds into which linear layer, and why not."""

  pairs: dict[Path, Path]  # BN path -> the linear layer it folds into
  layers: dict[Path, nn.Module]  # path -> the linear or BN module called there
  reasons: dict[Path, str]  # BN path -> why it cannot be folded


def find_pairs(
  model: nn.Module, variables: Mapping[str, Any], args: tuple, kwargs: dict
) -> FoldPlan:
  """The foldable BN layers of ``model.apply(variables, *args, **kwargs)`` (inference mode).

  Raises:
    ValueError: if a BN layer is called in training mode.
  """
  fn, arrays = _split_call(model, args, kwargs)
  trace = _Trace()

  def traced(variables, arrays):
    with nn.intercept_methods(trace):
      return fn(variables, arrays)

  jax.eval_shape(traced, variables, arrays)
  trace.outputs.clear()  # tracers, not to be kept past their trace
  flat = {col: traverse_util.flatten_dict(unfreeze(tree)) for col, tree in variables.items()}
  pairs = trace.checked_pairs(flat['params'], flat.get('batch_stats', {}))
  for bn in _used_elsewhere(fn, variables, arrays, trace, pairs):
    linear = layer_name(pairs.pop(bn))
    trace.reasons[bn] = f'the output of {linear} is also used elsewhere, which folding would change'
  return FoldPlan(pairs, trace.layers, trace.reasons)
