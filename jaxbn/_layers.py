"""The layer types that folding and precise statistics recognise, and the mode of a BN call.

Types are matched exactly, not by subclass: a subclass may change what its
call computes. Linear layers are those whose output is ``x @ kernel + bias``
along their output features (the last axes of ``kernel`` and ``bias``);
`jaxbn.folding.register_linear` adds a layer type of the user's to them.
"""

from __future__ import annotations

from flax import linen as nn
from flax import nnx

from jaxbn import nnx as jnnx
from jaxbn.linen import BatchNorm

LINEN_BATCH_NORMS = (BatchNorm, nn.BatchNorm)
NNX_BATCH_NORMS = (jnnx.BatchNorm, nnx.BatchNorm)
# Mutable: register_linear adds to them.
LINEN_LINEAR = {nn.Dense, nn.DenseGeneral, nn.Conv, nn.ConvTranspose}
NNX_LINEAR = {nnx.Linear, nnx.Conv, nnx.ConvTranspose}


def in_training(bn: nn.Module | nnx.Module, args: tuple, kwargs: dict) -> bool:
  """Whether the call ``bn(*args, **kwargs)`` of a linen or NNX BN layer uses batch statistics.

  The call's ``use_running_average`` (second positional or keyword argument)
  overrides the layer's own, as both APIs' ``__call__`` take it.
  """
  call = kwargs.get('use_running_average', args[1] if len(args) > 1 else None)
  if isinstance(bn, nn.Module):
    return not nn.merge_param('use_running_average', bn.use_running_average, call)
  return not (bn.use_running_average if call is None else call)
