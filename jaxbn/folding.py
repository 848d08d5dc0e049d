"""Folding inference-mode batch norm into the preceding dense or convolution layer.

In inference mode, a BN layer with running ``mean, var``, parameters ``scale,
bias`` and ``eps``, applied to the output ``W x + b`` of a linear layer, is
that linear layer with, per output feature (``scale = 1`` without
``use_scale``, ``bias = 0`` without ``use_bias``),

  m = scale / sqrt(var + eps),   W' = W * m,   b' = (b - mean) * m + bias.

* `fold` finds the foldable BN layers of a Flax linen model (`jaxbn._fold_pairs`, by tracing one
  inference call) and returns ``(apply_fn, params)``: the model with those BN
  layers skipped, and the folded kernels and biases. A BN layer is foldable when
  its input is the very array a Dense, DenseGeneral, Conv or ConvTranspose
  layer returned, normalised along the layer's output
  features, and nothing else uses that array (nor other calls of the layer):
  folding would change those other uses, so they make `fold` refuse the BN layer.
* `fold_nnx` (or `fold` given an NNX model) does the same for a Flax NNX model
  (`jaxbn._fold_pairs_nnx`) and returns a folded copy of the model.
* `fold_into_linear` is the equation for one (layer, BN) pair.
* `register_linear` makes a linear layer type of your own foldable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx, traverse_util
from jax import lax

from jaxbn._fold_pairs import FoldPlan, Path, find_pairs, flat_variables, layer_name
from jaxbn._fold_pairs_nnx import find_pairs_nnx
from jaxbn._layers import LINEN_LINEAR, NNX_LINEAR, in_training


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


def register_linear(layer_type: type) -> type:
  """Lets folding treat ``layer_type`` (exactly, not its subclasses) as a linear layer.

  Its call must compute ``x @ kernel + bias`` (or a convolution) along the
  output features F, the last axes of its output, from variables laid out as
  Flax's layers lay them out: a ``kernel`` (..., *F) and, when ``use_bias``, a
  ``bias`` (*F,). A linen layer declares them as params ``kernel`` and
  ``bias`` and names F in ``features`` (an int or a tuple); an NNX layer holds
  them as attributes ``kernel`` and ``bias`` (``nnx.data(None)`` without a
  bias, which folding then sets) and adds ``bias`` whenever it is not None.
  E.g. a convolution computed another way (a subclass of ``nn.Conv`` with its
  own ``__call__``), or a hand-written dense layer. Returns ``layer_type``, so
  that it can be a class decorator.

  Raises:
    TypeError: if ``layer_type`` is not a Flax linen or NNX module class.
  """
  if isinstance(layer_type, type) and issubclass(layer_type, nn.Module):
    LINEN_LINEAR.add(layer_type)
  elif isinstance(layer_type, type) and issubclass(layer_type, nnx.Module):
    NNX_LINEAR.add(layer_type)
  else:
    raise TypeError(
      f'register_linear takes a flax.linen.Module or flax.nnx.Module class, not {layer_type!r}.'
    )
  return layer_type


def _trailing(v: jax.Array, ndim: int) -> jax.Array:
  """``v`` reshaped to broadcast over the last axes of an ``ndim`` array (no rank promotion)."""
  return v.reshape((1,) * (ndim - v.ndim) + v.shape)


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
      if outputs.pop(pairs[path], None) is not args[0] or in_training(context.module, args, kwargs):
        raise ValueError(
          f'BN layer {layer_name(path)} is folded into {layer_name(pairs[path])}, but this '
          'call does not apply it to that output in inference mode as the call given to fold '
          'did.'
        )
      return args[0]

    with nn.intercept_methods(interceptor):
      return model.apply({**rest, 'params': params}, *args, **kwargs)

  return apply_fn


def fold(
  model: nn.Module, variables: Mapping[str, Any], *args, strict: bool = True, **kwargs
) -> tuple[Callable[..., Any], dict] | nnx.Module:
  """The inference-mode ``model`` with its BN layers folded into the preceding linear layers.

  For a Flax NNX model, ``fold(model, *args, **kwargs)`` is `fold_nnx` (no
  variables: the model holds them) and returns the folded model.

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
  if isinstance(model, nnx.Module):
    return fold_nnx(model, variables, *args, strict=strict, **kwargs)
  plan = find_pairs(model, variables, args, kwargs)
  _refuse(plan, model, strict)
  flat = flat_variables(variables)
  pairs = plan.pairs
  params, rest = _fold_variables(flat, pairs, plan.layers)
  return _folded_apply(model, rest, pairs), params


def _refuse(plan: FoldPlan, model: Any, strict: bool) -> None:
  """Raises, if ``strict``, naming each BN layer of ``plan`` that cannot be folded and why."""
  if plan.reasons and strict:
    lines = ''.join(f'\n  {layer_name(bn)}: {why}' for bn, why in sorted(plan.reasons.items()))
    raise ValueError(
      f'fold: {len(plan.reasons)} BN layer(s) of {type(model).__name__} cannot be folded '
      f'into a preceding linear layer:{lines}\nMove or remove them, or pass strict=False '
      'to fold the others and keep these as they are.'
    )


class FoldedBatchNorm(nnx.Module):
  """What `fold_nnx` leaves of a folded BN layer: the identity, in inference mode only."""

  def __init__(self, bn: Path, linear: Path):
    self.use_running_average = True
    self.message = (
      f'BN layer {layer_name(bn)} is folded into {layer_name(linear)}: the folded model '
      'computes inference only (model.eval()).'
    )

  def __call__(self, x: jax.Array, use_running_average: bool | None = None, **_) -> jax.Array:
    if not (self.use_running_average if use_running_average is None else use_running_average):
      raise ValueError(self.message)
    return x


def _fold_nnx_pair(linear: nnx.Module, bn: nnx.Module) -> None:
  """Folds ``bn`` into ``linear``'s kernel and bias, in place (a bias is added if it has none)."""
  kernel, bias = fold_into_linear(
    linear.kernel[...],
    None if linear.bias is None else linear.bias[...],
    {k: getattr(bn, k)[...] for k in ('scale', 'bias') if getattr(bn, k) is not None},
    {'mean': bn.mean[...], 'var': bn.var[...]},
    bn.epsilon,
  )
  linear.kernel.set_value(kernel)
  if linear.bias is None:
    linear.bias, linear.use_bias = nnx.Param(bias), True
  else:
    linear.bias.set_value(bias)


def fold_nnx(model: nnx.Module, *args, strict: bool = True, **kwargs) -> nnx.Module:
  """A copy of NNX ``model`` in ``eval()`` mode with its BN layers folded into the linear ones.

  Traces ``model(*args, **kwargs)`` once in ``eval()`` mode (abstractly, on a
  copy; `jaxbn._fold_pairs_nnx`) and folds each foldable `jaxbn.nnx.BatchNorm`
  or ``flax.nnx.BatchNorm`` into the ``nnx.Linear``, ``nnx.Conv`` or
  ``nnx.ConvTranspose`` before it, as `fold` does for linen: that layer's
  kernel and bias become the folded ones (float32 or wider; a layer without a
  bias gets one) and the BN layer is replaced by a `FoldedBatchNorm`, which
  raises in training mode. E.g.::

    folded = fold(model, images)  # or fold_nnx
    logits = nnx.jit(lambda m, x: m(x))(folded, images)

  Args:
    model: a Flax NNX module (not changed).
    *args: the example call's positional arguments.
    strict: raise if some BN layer cannot be folded; if False, such layers stay.
    **kwargs: the example call's keyword arguments.

  Returns:
    The folded model, computing ``model``'s inference outputs for calls like the example's.

  Raises:
    ValueError: naming each BN layer that cannot be folded and why (if
      ``strict``), or a BN layer called in training mode in the example call.
  """
  plan = find_pairs_nnx(model, args, kwargs)
  _refuse(plan, model, strict)
  folded = nnx.clone(model)
  folded.eval()
  nodes = dict(nnx.iter_graph(folded))
  for bn, linear in plan.pairs.items():
    _fold_nnx_pair(nodes[linear], nodes[bn])
    parent, key = nodes[bn[:-1]], bn[-1]
    if isinstance(parent, Mapping | Sequence):  # nnx.Dict, nnx.List
      parent[key] = FoldedBatchNorm(bn, linear)
    else:
      setattr(parent, key, FoldedBatchNorm(bn, linear))
  return folded
