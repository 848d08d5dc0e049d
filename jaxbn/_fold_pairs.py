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

from jaxbn._layers import LINEN_BATCH_NORMS, LINEN_LINEAR, in_training
from jaxbn.statistics import canonicalize_axes

Path = tuple[str, ...]
_NOT_LINEAR = (
  'its input is not the very output of a Dense, DenseGeneral, Conv or ConvTranspose '
  'layer (e.g. an activation, a reshape or the model input comes between)'
)


def flat_variables(variables: Mapping[str, Any]) -> dict[str, dict[Path, Any]]:
  """``{collection: {path of a leaf: leaf}}`` of linen ``variables`` (frozen or not)."""
  return {col: traverse_util.flatten_dict(unfreeze(tree)) for col, tree in variables.items()}


def layer_name(path: Path) -> str:
  """A layer path as the errors name it, e.g. \'block1/bn\' (or \'blocks/0/bn\' in NNX)."""
  return repr('/'.join(map(str, path))) if path else 'the model itself'


class CannotFold(Exception):
  """Why a BN layer cannot be folded (its message), raised while tracing and recorded."""


def _linen_features(layer: nn.Module, path: Path) -> int:
  """How many last axes of a linen linear layer's output are its features.

  Raises:
    CannotFold: if the layer's form is one folding does not cover.
  """
  if getattr(layer, 'batch_dims', ()):
    raise CannotFold(f'{layer_name(path)} has batch_dims (not supported)')
  if getattr(layer, 'transpose_kernel', False):
    raise CannotFold(f'{layer_name(path)} has transpose_kernel=True (not supported)')
  return 1 if isinstance(layer.features, int) else len(layer.features)


def _check_feature_axes(bn_axis, k: int, linear: Path, x: jax.Array, out: jax.Array) -> None:
  """Raises `CannotFold` unless the BN layer normalises the last ``k`` axes of ``x`` in its dtype.

  ``x``: the output of the linear layer at ``linear``, whose last ``k`` axes
  are its features; ``out``: the BN layer's output.
  """
  if canonicalize_axes(x.ndim, bn_axis) != tuple(range(x.ndim - k, x.ndim)):
    raise CannotFold(
      f'its axis={bn_axis} is not the output-feature axis of {layer_name(linear)} (the last '
      f'{k} of {x.ndim} axes)'
    )
  if out.dtype != x.dtype:
    raise CannotFold(f'it changes the dtype ({x.dtype} to {out.dtype}); folding would not')


def refuse_training(path: Path, bn: Any, args: tuple, kwargs: dict) -> None:
  """Raises if the call ``bn(*args, **kwargs)`` of the BN layer at ``path`` is in training mode."""
  if in_training(bn, args, kwargs):
    raise ValueError(
      f'fold: BN layer {layer_name(path)} is in training mode (use_running_average=False) in '
      'the example call: pass the inference-mode arguments, e.g. train=False.'
    )


class _Pair(NamedTuple):
  linear: Path  # the linear layer whose output the BN layer receives
  features: tuple[int, ...]  # the feature shape F
  output: jax.ShapeDtypeStruct  # the linear layer's output


class Trace:
  """Pairs each BN call with the linear layer whose output it receives; linen's interceptor.

  "Receives" is identity of the traced array: anything applied in between (an
  activation, a reshape, a residual sum) makes a new array, and no pair.
  `linear` and `bn` take the calls of either API; calling the trace itself is
  linen's interceptor. ``features(layer, path)`` is `_linen_features` for another API.
  """

  def __init__(self, features=_linen_features, not_linear=_NOT_LINEAR):
    self.features, self.not_linear = features, not_linear
    self.calls = collections.Counter()  # path -> number of calls
    self.layers = {}  # path -> linear or BN module (for its attributes)
    self.outputs = {}  # id -> (linear path, its output, kept alive so that ids stay unique)
    self.pairs = {}  # BN path -> _Pair
    self.reasons = {}  # BN path -> why it cannot be folded

  def linear(self, path: Path, layer: Any, out: jax.Array) -> None:
    """Records a call of the linear ``layer`` at ``path`` that returned ``out``."""
    self.calls[path] += 1
    self.layers[path] = layer
    self.outputs[id(out)] = (path, out)

  def bn(self, path: Path, bn: Any, x: jax.Array, out: jax.Array) -> None:
    """Records a call ``out = bn(x)`` of the BN layer at ``path`` (`refuse_training` first)."""
    self.calls[path] += 1
    self.layers[path] = bn
    linear, source = self.outputs.get(id(x), (None, None))
    try:
      if source is not x:
        raise CannotFold(self.not_linear)
      k = self.features(self.layers[linear], linear)
      _check_feature_axes(bn.axis, k, linear, x, out)
      if any(p.linear == linear for p in self.pairs.values()):
        raise CannotFold(f'the output of {layer_name(linear)} also enters another BN layer')
    except CannotFold as e:
      self.reasons[path] = str(e)
      return
    self.pairs[path] = _Pair(linear, x.shape[x.ndim - k :], jax.ShapeDtypeStruct(x.shape, x.dtype))

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    linear = type(module) in LINEN_LINEAR
    if context.method_name != '__call__' or not (linear or type(module) in LINEN_BATCH_NORMS):
      return next_fun(*args, **kwargs)
    if not linear:
      refuse_training(module.path, module, args, kwargs)
    out = next_fun(*args, **kwargs)
    if linear:
      self.linear(module.path, module, out)
    else:
      self.bn(module.path, module, args[0], out)
    return out

  def checked_pairs(self, params: dict | None = None, stats: dict | None = None) -> dict:
    """BN path -> linear path, for the pairs that one call each and the variables allow.

    ``params`` and ``stats``: linen's flattened variables (None in NNX, whose
    layers hold their own).
    """
    for bn, (linear, features, _) in self.pairs.items():
      if self.calls[bn] > 1:
        self.reasons.setdefault(bn, f'it is called {self.calls[bn]} times')
      elif self.calls[linear] > 1:
        self.reasons[bn] = f'{layer_name(linear)} is called {self.calls[linear]} times'
      elif params is not None and not _one_call(params, stats, bn, linear, features):
        self.reasons[bn] = 'its variables are not those of one call (in an nn.scan or nn.vmap?)'
    return {bn: pair.linear for bn, pair in self.pairs.items() if bn not in self.reasons}


def _one_call(params: dict, stats: dict, bn: Path, linear: Path, features: tuple) -> bool:
  """Whether the linen variables of ``bn`` and ``linear`` have the feature shape of one call."""
  shapes = [stats[(*bn, 'mean')].shape, params[(*linear, 'kernel')].shape[-len(features) :]]
  shapes += [params[(*linear, 'bias')].shape] if (*linear, 'bias') in params else []
  return all(s == features for s in shapes)


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


class _Probe:
  """Adds a zero ``d`` of its own to each paired linear output ``y``, except at its BN layer.

  `output` gives the linear layer's callers ``y + d``; `bn_input` gives the
  BN layer ``y`` back when it receives that very ``y + d``. The model's
  outputs then depend on ``d`` exactly when something else uses ``y``.
  """

  def __init__(self, pairs: dict[Path, Path], deltas: list):
    self.pairs = pairs
    self.index = {linear: i for i, linear in enumerate(pairs.values())}
    self.deltas = deltas
    self.clean = {}  # id(y + d) -> (y + d, y, linear path)

  def output(self, path: Path, y: jax.Array) -> jax.Array:
    raw = y + self.deltas[self.index[path]]
    self.clean[id(raw)] = (raw, y, path)
    return raw

  def bn_input(self, path: Path, x: jax.Array) -> jax.Array:
    raw, y, linear = self.clean.get(id(x), (None, None, None))
    return y if raw is x and linear == self.pairs[path] else x

  def intercept(self, path: Path, call: Callable, args: tuple, kwargs: dict) -> Any:
    """``call(*args, **kwargs)``, the call of the layer at ``path``, probed."""
    if path in self.index:
      return self.output(path, call(*args, **kwargs))
    if path in self.pairs and args:
      args = (self.bn_input(path, args[0]), *args[1:])
    return call(*args, **kwargs)

  def __call__(self, next_fun, args, kwargs, context):
    """linen's interceptor."""
    path = context.module.path if context.method_name == '__call__' else None
    return self.intercept(path, next_fun, args, kwargs)


def used_elsewhere(probe_fn: Callable, inputs: Any, trace: Trace, pairs: dict) -> set:
  """The BN layers of ``pairs`` whose linear layer's output is also used by anything else.

  ``probe_fn(inputs, probe)`` runs the model with the `_Probe` ``probe``
  intercepting its calls; it is traced (not run) with a zero input ``d`` per pair.
  """
  if not pairs:
    return set()
  bns = list(pairs)
  deltas = [trace.pairs[bn].output for bn in bns]
  fn = lambda inputs, deltas: probe_fn(inputs, _Probe(pairs, deltas))
  jaxpr = jax.make_jaxpr(fn)(inputs, deltas).jaxpr
  return {bns[i] for i in _reaching(jaxpr, jaxpr.invars[-len(bns) :])}


def split_call(call: Callable, args: tuple, kwargs: dict) -> tuple[Callable, list]:
  """``(fn, arrays)`` with ``fn(variables, arrays) = call(variables, *args, **kwargs)``.

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
    return call(variables, *args, **kwargs)

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
  fn, arrays = split_call(model.apply, args, kwargs)
  trace = Trace()

  def traced(variables, arrays):
    with nn.intercept_methods(trace):
      return fn(variables, arrays)

  jax.eval_shape(traced, variables, arrays)
  trace.outputs.clear()  # tracers, not to be kept past their trace
  flat = flat_variables(variables)
  pairs = trace.checked_pairs(flat['params'], flat.get('batch_stats', {}))

  def probe_fn(inputs, probe):
    with nn.intercept_methods(probe):
      return fn(*inputs)

  return plan(trace, pairs, used_elsewhere(probe_fn, (variables, arrays), trace, pairs))


def plan(trace: Trace, pairs: dict[Path, Path], elsewhere: set[Path]) -> FoldPlan:
  """The `FoldPlan` of ``pairs`` without the BN layers of ``elsewhere`` (`used_elsewhere`)."""
  for bn in elsewhere:
    linear = layer_name(pairs.pop(bn))
    trace.reasons[bn] = f'the output of {linear} is also used elsewhere, which folding would change'
  return FoldPlan(pairs, trace.layers, trace.reasons)
