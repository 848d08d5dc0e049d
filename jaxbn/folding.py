"""Folding inference-mode batch norm into the preceding dense or convolution layer.

In inference mode, a BN layer with running ``mean, var``, parameters ``scale,
bias`` and ``eps``, applied to the output ``W x + b`` of a linear layer, is
that linear layer with, per output feature (``scale = 1`` without
``use_scale``, ``bias = 0`` without ``use_bias``),

  m = scale / sqrt(var + eps),   W' = W * m,   b' = (b - mean) * m + bias.

* `fold` finds the foldable BN layers of a Flax linen model by tracing one
  inference call, and returns ``(apply_fn, params)``: the model with those BN
  layers skipped, and the folded kernels and biases. A BN layer is foldable when
  its input is the very array a Dense, DenseGeneral, Conv, ConvTranspose or
  `jaxbn.kernels.BandedConv` layer returned, normalised along the layer's output
  features, and nothing else uses that array (nor other calls of the layer):
  folding would change those other uses, so they make `fold` refuse the BN layer.
* `fold_into_linear` is the equation for one (layer, BN) pair.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util
from flax.core import unfreeze
from jax import lax
from jax.extend.core import Var

from jaxbn import kernels
from jaxbn.functional import canonicalize_axes
from jaxbn.linen import BatchNorm

# Exact types, not subclasses: a subclass may change what its call computes.
LINEAR_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.ConvTranspose, kernels.BandedConv)
BATCH_NORMS = (BatchNorm, nn.BatchNorm)
Path = tuple[str, ...]
_NOT_LINEAR = (
  'its input is not the very output of a Dense, DenseGeneral, Conv, ConvTranspose or '
  'BandedConv layer (e.g. an activation, a reshape or the model input comes between)'
)


def fold_into_linear(
  kernel: jax.Array,
  bias: jax.Array | None,
  bn_params: Mapping[str, jax.Array],
  bn_stats: Mapping[str, jax.Array],
  epsilon: float,
) -> tuple[jax.Array, jax.Array]:
  """Kernel and bias of a layer equal to ``layer -> BN`` in inference mode.

  Args:
    kernel: (..., *F) weights with the output features F last (Flax's Dense
      (I, F), Conv (H, W, I, F), DenseGeneral (..., F1, F2)).
    bias: (*F,) bias of the layer, or None.
    bn_params: those of the BN layer's ``scale`` and ``bias`` (*F,) it uses.
    bn_stats: its ``batch_stats`` (``mean`` and ``var``, (*F,)).
    epsilon: the BN layer's epsilon.

  Returns:
    ``(kernel, bias)`` of the folded layer, in float32 or wider.
  """
  multiplier = lax.rsqrt(bn_stats['var'] + epsilon)
  if 'scale' in bn_params:
    multiplier = multiplier * bn_params['scale']
  bias = jnp.zeros_like(bn_stats['mean']) if bias is None else bias
  folded_bias = (bias - bn_stats['mean']) * multiplier
  if 'bias' in bn_params:
    folded_bias = folded_bias + bn_params['bias']
  return kernel * _trailing(multiplier, kernel.ndim), folded_bias


def _trailing(v: jax.Array, ndim: int) -> jax.Array:
  """``v`` reshaped to broadcast over the last axes of an ``ndim`` array (no rank promotion)."""
  return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def _name(path: Path) -> str:
  return repr('/'.join(path)) if path else 'the model itself'


def _feature_ndim(bn: nn.Module, layer: nn.Module, x: jax.Array, out: jax.Array) -> int | str:
  """How many last axes of ``x`` (``layer``'s output) are features, or why ``bn`` cannot fold."""
  k = 1 if isinstance(layer.features, int) else len(layer.features)
  if getattr(layer, 'batch_dims', ()):
    return f'{_name(layer.path)} has batch_dims (not supported)'
  if getattr(layer, 'transpose_kernel', False):
    return f'{_name(layer.path)} has transpose_kernel=True (not supported)'
  if canonicalize_axes(x.ndim, bn.axis) != tuple(range(x.ndim - k, x.ndim)):
    return (
      f'its axis={bn.axis} is not the output-feature axis of {_name(layer.path)} (the last '
      f'{k} of {x.ndim} axes)'
    )
  if out.dtype != x.dtype:
    return f'it changes the dtype ({x.dtype} to {out.dtype}); folding would not'
  return k


def _inference_mode(bn: nn.Module, args: tuple, kwargs: dict) -> bool:
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
    if not _inference_mode(module, args, kwargs):
      raise ValueError(
        f'fold: BN layer {_name(path)} is in training mode (use_running_average=False) in '
        'the example call: pass the inference-mode arguments, e.g. train=False.'
      )
    x, out = args[0], next_fun(*args, **kwargs)
    linear, source = self.outputs.get(id(x), (None, None))
    k = _feature_ndim(module, self.layers[linear], x, out) if source is x else _NOT_LINEAR
    if isinstance(k, int) and any(p.linear == linear for p in self.pairs.values()):
      k = f'the output of {_name(linear)} also enters another BN layer'
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
        self.reasons[bn] = f'{_name(linear)} is called {self.calls[linear]} times'
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


def _fold_variables(flat: dict, pairs: dict, layers: dict) -> tuple[dict, dict]:
  """The folded ``params``, and the other collections without the folded BN layers."""
  params, stats = flat['params'], flat.get('batch_stats', {})
  for bn, linear in pairs.items():
    use = {'scale': layers[bn].use_scale, 'bias': layers[bn].use_bias}
    kernel, bias = (*linear, 'kernel'), (*linear, 'bias')
    params[kernel], params[bias] = fold_into_linear(
      params[kernel],
      params.get(bias),
      {k: params[(*bn, k)] for k in use if use[k]},
      {k: stats[(*bn, k)] for k in ('mean', 'var')},
      layers[bn].epsilon,
    )
  drop = lambda tree: traverse_util.unflatten_dict(
    {k: v for k, v in tree.items() if k[:-1] not in pairs}
  )
  rest = {col: drop(tree) for col, tree in flat.items() if col != 'params'}
  return drop(params), {col: tree for col, tree in rest.items() if tree}


def _folded_apply(model: nn.Module, rest: dict, pairs: dict) -> Callable:
  """``apply_fn(params, *args, **kwargs)``: ``model`` with the BN layers of ``pairs`` skipped."""
  linears = set(pairs.values())

  def apply_fn(params, *args, **kwargs):
    outputs = {}  # linear path -> its output in this call

    def interceptor(next_fun, args, kwargs, context):
      path = context.module.path if context.method_name == '__call__' else None
      if path in linears:
        y = next_fun(*args, **kwargs)
        if not context.module.use_bias:  # its folded bias is in params, unknown to the layer
          bias = context.module.get_variable('params', 'bias')
          y = y + _trailing(bias.astype(y.dtype), y.ndim)
        outputs[path] = y
        return y
      if path not in pairs:
        return next_fun(*args, **kwargs)
      if outputs.pop(pairs[path], None) is not args[0] or not _inference_mode(
        context.module, args, kwargs
      ):
        raise ValueError(
          f'BN layer {_name(path)} is folded into {_name(pairs[path])}, but this call does '
          'not apply it to that output in inference mode as the call given to fold did.'
        )
      return args[0]

    with nn.intercept_methods(interceptor):
      return model.apply({**rest, 'params': params}, *args, **kwargs)

  return apply_fn


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


def fold(
  model: nn.Module, variables: Mapping[str, Any], *args, strict: bool = True, **kwargs
) -> tuple[Callable[..., Any], dict]:
  """The inference-mode ``model`` with its BN layers folded into the preceding linear layers.

  Traces ``model.apply(variables, *args, **kwargs)`` once (abstractly: no
  arithmetic runs) and folds each foldable (see the module docstring)
  `jaxbn.BatchNorm` or `flax.linen.BatchNorm` layer with its own ``epsilon``,
  ``use_scale``, ``use_bias`` and running statistics. A layer with
  ``use_bias=False`` gets the folded bias too, added after its call. E.g.::

    apply_fn, params = fold(model, variables, images, train=False)
    logits = jax.jit(apply_fn, static_argnames='train')(params, images, train=False)

  Args:
    model: a Flax linen module.
    variables: its variables, with ``params`` and ``batch_stats``.
    *args: the example call's positional arguments, in inference mode.
    strict: raise if some BN layer cannot be folded; if False, such layers
      stay as they are (params in ``params``, statistics held by ``apply_fn``).
    **kwargs: the example call's keyword arguments, e.g. ``train=False``.

  Returns:
    ``(apply_fn, params)``: ``apply_fn(params, *args, **kwargs)`` is the
    model's inference output for arguments like the example's; ``params`` is
    ``variables['params']`` with the folded kernels and biases and without the
    folded BN layers. ``apply_fn`` holds the other collections (e.g. the
    ``batch_stats`` of BN layers left as they are).

  Raises:
    ValueError: naming each BN layer that cannot be folded and why (if
      ``strict``), or a BN layer in training mode in the example call.
      ``apply_fn`` raises if a folded BN layer is called otherwise.
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
    linear = _name(pairs.pop(bn))
    trace.reasons[bn] = f'the output of {linear} is also used elsewhere, which folding would change'
  if trace.reasons and strict:
    lines = ''.join(f'\n  {_name(bn)}: {why}' for bn, why in sorted(trace.reasons.items()))
    raise ValueError(
      f'fold: {len(trace.reasons)} BN layer(s) of {type(model).__name__} cannot be folded '
      f'into a preceding linear layer:{lines}\nMove or remove them, or pass strict=False '
      'to fold the others and keep these as they are.'
    )
  params, rest = _fold_variables(flat, pairs, trace.layers)
  return _folded_apply(model, rest, pairs), params
