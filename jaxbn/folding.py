"""Folding inference-mode batch norm into the preceding dense or convolution layer.

In inference mode, a BN layer with running ``mean, var``, parameters ``scale,
bias`` and ``eps``, applied to the output ``W x + b`` of a linear layer, is
that linear layer with, per output feature (``scale = 1`` without
``use_scale``, ``bias = 0`` without ``use_bias``),

  m = scale / sqrt(var + eps),   W' = W * m,   b' = (b - mean) * m + bias.

* `fold` finds the foldable BN layers of a Flax linen model (`jaxbn.fold_pairs`, by tracing one
  inference call) and returns ``(apply_fn, params)``: the model with those BN
  layers skipped, and the folded kernels and biases. A BN layer is foldable when
  its input is the very array a Dense, DenseGeneral, Conv or ConvTranspose
  layer returned, normalised along the layer's output
  features, and nothing else uses that array (nor other calls of the layer):
  folding would change those other uses, so they make `fold` refuse the BN layer.
* `fold_into_linear` is the equation for one (layer, BN) pair.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util
from flax.core import unfreeze
from jax import lax

from jaxbn.fold_pairs import find_pairs, inference_mode, layer_name


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
      if outputs.pop(pairs[path], None) is not args[0] or not inference_mode(
        context.module, args, kwargs
      ):
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
  plan = find_pairs(model, variables, args, kwargs)
  if plan.reasons and strict:
    lines = ''.join(f'\n  {layer_name(bn)}: {why}' for bn, why in sorted(plan.reasons.items()))
    raise ValueError(
      f'fold: {len(plan.reasons)} BN layer(s) of {type(model).__name__} cannot be folded '
      f'into a preceding linear layer:{lines}\nMove or remove them, or pass strict=False '
      'to fold the others and keep these as they are.'
    )
  flat = {col: traverse_util.flatten_dict(unfreeze(tree)) for col, tree in variables.items()}
  pairs = plan.pairs
  params, rest = _fold_variables(flat, pairs, plan.layers)
  return _folded_apply(model, rest, pairs), params
