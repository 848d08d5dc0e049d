"""`BatchNorm`: an Equinox layer around `jaxbn.batch_norm`, a drop-in for `equinox.nn.BatchNorm`.

Import it explicitly (``from jaxbn.equinox import BatchNorm``): ``import jaxbn``
does not import Equinox, an optional dependency (``pip install jaxbn[equinox]``).

Equinox calls a layer on one example and puts the batch on a named axis of
``jax.vmap`` (or ``pmap``)::

  model, state = eqx.nn.make_with_state(Model)(...)
  batched = jax.vmap(model, axis_name='batch', in_axes=(0, None), out_axes=(0, None))
  y, state = batched(x, state)  # x (N, C, H, W): each call of the layer sees (C, H, W)

so `BatchNorm` normalises its input of shape ``(input_size, *spatial)`` per
channel (axis 0, channels first as Equinox's convolutions), with statistics
over the spatial axes and, through ``axis_name``, over the examples of the
named axes (of all of them when several names are given). Unnamed ``vmap``
axes around it are not averaged over.

Conventions, as `jaxbn.batch_norm`'s:

* ``momentum`` is the decay of the running average, ``running = momentum *
  running + (1 - momentum) * batch`` (Equinox's direction and default 0.99;
  PyTorch's ``momentum=0.1`` is ``0.9`` here).
* Normalisation divides by the biased batch variance; the running variance
  holds the biased one too unless ``unbiased_running_var=True`` (PyTorch's
  ``n / (n - 1)``, ``n`` values per channel across the named axes).
* Training mode has batch norm's closed-form derivative (``mode='batch'``).

Faults of ``equinox.nn.BatchNorm`` (Equinox 0.13.8) that this layer does not
have (tests/test_equinox.py shows each on Equinox's layer):

* ``mode`` left out means ``'batch'``, without a warning; Equinox's means
  ``'ema'`` (with a warning), which normalises training batches with lagging
  running averages (equinox#659).
* ``mode='ema'`` starts its running variance at 1, not 0: an untrained model
  in inference mode divides by ``sqrt(1 + eps)``, not ``sqrt(eps)``
  (equinox#955).
* ``mode='batch'`` corrects its running averages for their start as Equinox
  does (``hidden / (1 - momentum**steps)``, no division by zero before the
  first step, equinox#1010) but for the variance's start at 1:
  ``(hidden - momentum**steps) / (1 - momentum**steps)``. Equinox's inference
  variance after k steps is ``momentum**k / (1 - momentum**k)`` too large (99
  after one step at momentum 0.99); this one is the weighted average of the
  batch variances seen. The state is Equinox's, value for value.
* ``axis_name`` is a static field, so ``jax.device_put`` of a model works
  (equinox#1074); a list of names is kept as a tuple. An ``inference`` flag
  that has become an array (as ``device_put`` makes of it) may be traced.
* ``mode='ema'`` works under ``pmap``; Equinox's sets its first-time flag to
  a new constant there, which ``State.set`` rejects (not found in Equinox's tracker).

Other differences: statistics are reduced in at least float32 (Equinox's in
the input's dtype), with jaxbn's one-pass variance shifted by the running
mean (``use_fast_variance=False``: two passes, as Equinox's), and no gradient
flows into the new state.

Not supported: virtual (ghost) batches, as ``vmap``'s collectives cannot
address groups of a named axis (``axis_index_groups``); batch
renormalization, ``momentum=None`` and ``unbiased_running_var`` with
``mode='ema'``; automatic folding of whole models (`fold_pair` folds one
layer pair); Equinox's own ``equinox.nn.BatchNorm`` in `fold_pair` and
`precise_batch_stats`.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax

try:
  import equinox as eqx
except ImportError as e:
  raise ModuleNotFoundError(
    'jaxbn.equinox needs Equinox, an optional dependency of jaxbn: pip install "jaxbn[equinox]".',
    name='equinox',
  ) from e

from jaxbn._functional import batch_norm
from jaxbn._renorm import renorm_schedule
from jaxbn._running import ema_update
from jaxbn.folding import fold_into_linear
from jaxbn.precise import _average
from jaxbn.statistics import batch_statistics

__all__ = ['BatchNorm', 'FoldedBatchNorm', 'fold_pair', 'precise_batch_stats']

MODES = ('batch', 'ema')


def _promote(*dtypes: Any) -> jnp.dtype:
  """``dtypes`` promoted pairwise, as arithmetic on them promotes (strict promotion too)."""
  return functools.reduce(jnp.promote_types, dtypes)


class BatchNorm(eqx.nn.StatefulLayer):
  """Batch normalization over a named batch axis, with running statistics in ``eqx.nn.State``.

  A drop-in for `equinox.nn.BatchNorm`: the same constructor, call, fields
  and state (``weight``, ``bias`` of shape ``(input_size,)`` or None;
  ``mode='batch'``: ``batch_counter`` (int scalar: training steps taken) and
  ``batch_state_index`` (hidden mean and variance, ``(input_size,)`` each,
  starting at 0 and 1); ``mode='ema'``: ``ema_first_time_index`` (bool) and
  ``ema_state_index`` (running mean and variance)), the same modes
  (``inference``, `equinox.nn.inference_mode`, the call's ``inference``).
  Used inside ``jax.vmap`` or ``pmap`` with a matching ``axis_name`` (a
  ``NameError`` otherwise, in training mode), on inputs of shape
  ``(input_size, *spatial)``.

  ``mode='batch'`` (the default): training normalises with the statistics of
  the batch (the named axes and the spatial ones), by `jaxbn.batch_norm` with
  its closed-form derivative, and updates the hidden averages ``hidden =
  momentum * hidden + (1 - momentum) * batch``; inference normalises with the
  hidden averages corrected for their start, ``(hidden - momentum**k *
  start) / (1 - momentum**k)`` after ``k`` steps (``start``: 0 for the mean, 1
  for the variance; the start itself before any step). ``mode='ema'``:
  Equinox's other mode, normalising in training too with the running
  averages, which the first batch's statistics replace. See the module
  docstring for where this differs from Equinox.

  Beyond Equinox (``mode='batch'``): ``momentum=None`` keeps the
  equal-weight average of all batches (``batch_counter`` counts them);
  ``unbiased_running_var``; ``use_fast_variance`` (jaxbn's one-pass
  variance shifted by the running mean, or two passes); ``renorm_clip`` and
  ``renorm_warmup_steps`` (batch renormalization, warmed up over
  ``batch_counter``); the call's ``mask``.

  Example::

    >>> import equinox as eqx, jax, jax.numpy as jnp
    >>> from jaxbn.equinox import BatchNorm
    >>> bn, state = eqx.nn.make_with_state(BatchNorm)(3, 'batch', momentum=0.75)
    >>> x = jnp.array([[1.0, 2.0, 3.0], [3.0, 6.0, 9.0]])  # 2 examples, 3 channels
    >>> train = jax.vmap(bn, axis_name='batch', in_axes=(0, None), out_axes=(0, None))
    >>> y, state = train(x, state)
    >>> state.get(bn.batch_state_index)  # hidden: 0.75 * (0, 1) + 0.25 * batch's
    (Array([0.5, 1. , 1.5], dtype=float32), Array([1.  , 1.75, 3.  ], dtype=float32))
    >>> bn.running_statistics(state)  # their start (0, 1) taken out: the batch's
    (Array([2., 4., 6.], dtype=float32), Array([1., 4., 9.], dtype=float32))

  Args:
    input_size: the number of channels, the size of axis 0 of the input.
    axis_name: the named ``vmap`` / ``pmap`` axis of the batch, or a tuple
      (or list) of names to average over all of them.
    eps: added to the variance before the square root.
    channelwise_affine: learn a per-channel ``weight`` (gamma) and ``bias``
      (beta).
    momentum: the decay of the running averages in [0, 1], or None
      (``mode='batch'`` only) for their cumulative average.
    inference: inference mode if True (toggled by `equinox.nn.inference_mode`).
    dtype: of ``weight``, ``bias`` and the running statistics (default:
      float32, float64 with ``jax_enable_x64``).
    mode: ``'batch'`` or ``'ema'``; ``'legacy'`` (Equinox's default) means
      ``'batch'`` here, without a warning.
    unbiased_running_var: keep ``n / (n - 1)`` times the batch variance in
      the running variance.
    use_fast_variance: one pass (moments shifted by the running mean) or two.
    renorm_clip: ``(rmax, dmax)`` of batch renormalization, or None.
    renorm_warmup_steps: steps over which the renorm bounds widen from
      ``(1, 0)`` to ``renorm_clip``; 0 uses ``renorm_clip`` from the start.
  """

  weight: jax.Array | None
  bias: jax.Array | None
  ema_first_time_index: eqx.nn.StateIndex | None
  ema_state_index: eqx.nn.StateIndex | None
  batch_counter: eqx.nn.StateIndex | None
  batch_state_index: eqx.nn.StateIndex | None
  axis_name: Hashable | tuple[Hashable, ...] = eqx.field(static=True)
  inference: bool
  input_size: int = eqx.field(static=True)
  eps: float = eqx.field(static=True)
  channelwise_affine: bool = eqx.field(static=True)
  momentum: float | None = eqx.field(static=True)
  mode: Literal['batch', 'ema'] = eqx.field(static=True)
  unbiased_running_var: bool = eqx.field(static=True)
  use_fast_variance: bool = eqx.field(static=True)
  renorm_clip: tuple[float, float] | None = eqx.field(static=True)
  renorm_warmup_steps: int = eqx.field(static=True)
  # Set on the copies that `precise_batch_stats` runs: the hidden averages
  # then take the batch statistics themselves (momentum 0).
  _record_batch_stats: bool = eqx.field(static=True, repr=False)

  def __init__(
    self,
    input_size: int,
    axis_name: Hashable | Sequence[Hashable],
    eps: float = 1e-5,
    channelwise_affine: bool = True,
    momentum: float | None = 0.99,
    inference: bool = False,
    dtype: Any = None,
    mode: Literal['batch', 'ema', 'legacy'] = 'legacy',
    *,
    unbiased_running_var: bool = False,
    use_fast_variance: bool = True,
    renorm_clip: tuple[float, float] | None = None,
    renorm_warmup_steps: int = 0,
  ):
    mode = 'batch' if mode == 'legacy' else mode
    if mode not in MODES:
      raise ValueError("Invalid mode, must be 'ema' or 'batch'.")
    if momentum is not None and not 0.0 <= momentum <= 1.0:
      raise ValueError(
        f'momentum={momentum} is outside [0, 1]: it is the decay of the running average '
        '(0.99 keeps 99% of the old value); PyTorch-style momentum m is 1 - m here.'
      )
    extras = momentum is None or unbiased_running_var or renorm_clip is not None
    if mode == 'ema' and extras:
      raise ValueError(
        "mode='ema' takes neither momentum=None, unbiased_running_var nor renorm_clip: "
        "they are options of mode='batch'."
      )
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64) if dtype is None else dtype
    shape = (input_size,)
    self.weight = jnp.ones(shape, dtype) if channelwise_affine else None
    self.bias = jnp.zeros(shape, dtype) if channelwise_affine else None
    start = (jnp.zeros(shape, dtype), jnp.ones(shape, dtype))
    ema = mode == 'ema'
    self.ema_first_time_index = eqx.nn.StateIndex(jnp.array(True)) if ema else None
    self.ema_state_index = eqx.nn.StateIndex(start) if ema else None
    self.batch_counter = None if ema else eqx.nn.StateIndex(jnp.array(0))
    self.batch_state_index = None if ema else eqx.nn.StateIndex(start)
    # Static fields must be hashable: a list of names becomes a tuple.
    self.axis_name = tuple(axis_name) if isinstance(axis_name, list) else axis_name
    self.inference = inference
    self.input_size = input_size
    self.eps = eps
    self.channelwise_affine = channelwise_affine
    self.momentum = momentum
    self.mode = mode
    self.unbiased_running_var = unbiased_running_var
    self.use_fast_variance = use_fast_variance
    self.renorm_clip = None if renorm_clip is None else tuple(renorm_clip)
    self.renorm_warmup_steps = renorm_warmup_steps
    self._record_batch_stats = False

  def __call__(
    self,
    x: jax.Array,
    state: eqx.nn.State,
    *,
    key: Any = None,
    inference: bool | None = None,
    mask: jax.Array | None = None,
  ) -> tuple[jax.Array, eqx.nn.State]:
    """Normalizes one example ``x`` of shape ``(input_size, *spatial)``.

    Args:
      x: the input, channels first.
      state: the `equinox.nn.State` holding the running statistics.
      key: ignored, as Equinox's.
      inference: overrides the field of the same name.
      mask: boolean, broadcastable to ``x`` (e.g. a scalar: whether this
        example is real): only True entries enter the batch statistics, whose
        counts are summed across the named axes. ``mode='batch'`` only.

    Returns:
      ``(y, state)``: ``y`` of the shape of ``x``, and the state with the
      running statistics updated in training mode (unchanged in inference).
    """
    del key
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[0] != self.input_size:
      raise ValueError(
        f'{type(self).__name__}(input_size={self.input_size}) takes one example of shape '
        f'(input_size, *spatial), got {x.shape}: call it under jax.vmap(..., '
        f'axis_name={self.axis_name!r}) over the batch.'
      )
    if mask is not None and self.mode == 'ema':
      raise ValueError("mask is an option of mode='batch'.")
    inference = self.inference if inference is None else inference
    indices = self._indices()
    values = tuple(state.get(index) for index in indices)
    train = functools.partial(self._train, x, mask)
    infer = functools.partial(self._infer, x)
    try:
      inference = bool(inference)
    except jax.errors.ConcretizationTypeError:
      # A traced flag (e.g. an array leaf after jax.device_put, under jit).
      y, values = lax.cond(inference, infer, train, values)
    else:
      if inference:  # the state as it is, still valid (State.set invalidates its input)
        return infer(values)[0], state
      y, values = train(values)
    for index, value in zip(indices, values, strict=True):
      state = state.set(index, value)
    return y, state

  def running_statistics(self, state: eqx.nn.State) -> tuple[jax.Array, jax.Array]:
    """The ``(mean, var)``, each ``(input_size,)``, that inference mode normalises with.

    ``mode='batch'``: the hidden averages corrected for their start (see the
    class docstring); ``mode='ema'``: the running averages.
    """
    if self.mode == 'ema':
      return state.get(self.ema_state_index)
    return self._corrected(state.get(self.batch_counter), state.get(self.batch_state_index))

  def _indices(self) -> tuple[eqx.nn.StateIndex, eqx.nn.StateIndex]:
    if self.mode == 'ema':
      return self.ema_first_time_index, self.ema_state_index
    return self.batch_counter, self.batch_state_index

  def _out_dtype(self, x: jax.Array, stats_dtype: Any) -> jnp.dtype:
    # As Equinox's arithmetic: x, the statistics and the affine parameters promoted.
    params = () if self.weight is None else (self.weight.dtype,)
    return _promote(x.dtype, stats_dtype, *params)

  def _normalize(self, x: jax.Array, mean: jax.Array, var: jax.Array, stats_dtype: Any):
    """``x`` normalised with ``mean`` and ``var``; ``stats_dtype``: that of the state."""
    return batch_norm(
      x,
      self.weight,
      self.bias,
      mean,
      var,
      use_running_average=True,
      axis=0,
      epsilon=self.eps,
      dtype=self._out_dtype(x, stats_dtype),
    ).y

  def _start_weight(self, counter: jax.Array, dtype: Any) -> jax.Array | float:
    """The weight of the start (0, 1) in the hidden averages after ``counter`` steps.

    ``momentum**counter``, taken out by `_corrected`; 0 when the start is all
    they hold (before the first step, or with momentum 1) or none of them (a
    cumulative average, ``momentum=None``).
    """
    if self.momentum is None:
      return 0.0
    w = jnp.asarray(self.momentum, _promote(dtype, jnp.float32)) ** counter
    return jnp.where((counter == 0) | (w == 1), 0.0, w)

  def _corrected(self, counter: jax.Array, hidden: tuple) -> tuple[jax.Array, jax.Array]:
    """The hidden averages ``(mean, var)`` with their start (0, 1) taken out."""
    mean, var = hidden
    w = self._start_weight(counter, mean.dtype)
    corrected = (mean / (1 - w), jnp.maximum(var - w, 0) / (1 - w))
    return tuple(c.astype(h.dtype) for c, h in zip(corrected, hidden, strict=True))

  def _infer(self, x: jax.Array, values: tuple) -> tuple[jax.Array, tuple]:
    stats = values[1] if self.mode == 'ema' else self._corrected(*values)
    return self._normalize(x, *stats, values[1][0].dtype), values

  def _train(self, x: jax.Array, mask: jax.Array | None, values: tuple) -> tuple[jax.Array, tuple]:
    if self.mode == 'ema':
      return self._train_ema(x, *values)
    counter, hidden = values
    # Renormalization compares the batch with the running averages proper,
    # the corrected ones; the hidden ones are updated all the same (below).
    running = hidden if self.renorm_clip is None else self._corrected(counter, hidden)
    renorm_clip = self.renorm_clip
    if renorm_clip is not None and self.renorm_warmup_steps:
      renorm_clip = renorm_schedule(counter, *renorm_clip, self.renorm_warmup_steps)
    momentum = 0.0 if self._record_batch_stats else self.momentum
    y, *new = batch_norm(
      x,
      self.weight,
      self.bias,
      *running,
      use_running_average=False,
      axis=0,
      momentum=momentum,
      epsilon=self.eps,
      count=counter,
      unbiased_running_var=self.unbiased_running_var,
      use_fast_variance=self.use_fast_variance,
      mask=mask,
      axis_name=self.axis_name,
      renorm_clip=renorm_clip,
      dtype=self._out_dtype(x, hidden[0].dtype),
      name=f'{type(self).__name__}(input_size={self.input_size})',
    )
    if renorm_clip is not None and momentum:
      # momentum * running + (1 - momentum) * batch, moved to the hidden averages.
      new = [n + momentum * (h - r) for n, h, r in zip(new, hidden, running, strict=True)]
    # State, not part of the loss: no gradient flows into it.
    new = tuple(lax.stop_gradient(n).astype(h.dtype) for n, h in zip(new, hidden, strict=True))
    return y, (counter + 1, new)

  def _train_ema(self, x: jax.Array, first_time: jax.Array, running: tuple) -> tuple:
    reduction_axes = tuple(range(1, x.ndim))
    batch = batch_statistics(
      x.astype(_promote(x.dtype, jnp.float32)),
      reduction_axes,
      use_fast_variance=self.use_fast_variance,
      axis_name=self.axis_name,
      shift=jnp.expand_dims(running[0], reduction_axes),
    )
    # Normalised with the updated averages, the gradient flowing through the
    # batch's share of them (as Equinox's); the first batch replaces them.
    stats = ema_update(running, batch, self.momentum)
    stats = tuple(jnp.where(first_time, b, s) for b, s in zip(batch, stats, strict=True))
    new = tuple(lax.stop_gradient(s).astype(r.dtype) for s, r in zip(stats, running, strict=True))
    # False, typed as the old flag (under pmap, a constant would not be).
    y = self._normalize(x, *stats, running[0].dtype)
    return y, (jnp.logical_and(first_time, False), new)


class FoldedBatchNorm(eqx.nn.StatefulLayer):
  """What `fold_pair` leaves of a BN layer: adds ``offset`` (or nothing), in inference only.

  Called as the BN layer was, ``(x, state) -> (x + offset, state)`` with
  ``offset`` of shape ``(channels,)`` broadcast over the spatial axes of a
  ``(channels, *spatial)`` input. It raises in training mode (``inference``
  False, e.g. after ``eqx.nn.inference_mode(model, False)``): the folded
  model has no batch statistics.
  """

  offset: jax.Array | None
  inference: bool

  def __init__(self, offset: jax.Array | None = None):
    self.offset = offset
    self.inference = True

  def __call__(
    self, x: jax.Array, state: eqx.nn.State, *, key: Any = None, inference: bool | None = None
  ) -> tuple[jax.Array, eqx.nn.State]:
    del key
    if (self.inference if inference is None else inference) is False:
      raise ValueError(
        'This BN layer is folded into the layer before it (jaxbn.equinox.fold_pair): '
        'the folded model computes inference only.'
      )
    if self.offset is None:
      return x, state
    return x + self.offset.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype), state


def _batch_norms(model: Any) -> list[BatchNorm]:
  """The `BatchNorm` layers of ``model``; a TypeError for Equinox's own."""
  is_bn = lambda m: isinstance(m, BatchNorm | eqx.nn.BatchNorm)
  layers = [m for m in jax.tree.leaves(model, is_leaf=is_bn) if is_bn(m)]
  for layer in layers:
    if isinstance(layer, eqx.nn.BatchNorm):
      raise TypeError(
        'equinox.nn.BatchNorm is not supported here: use jaxbn.equinox.BatchNorm, '
        'its drop-in (the same constructor and call).'
      )
  return layers


def fold_pair(linear: eqx.Module, bn: BatchNorm, state: eqx.nn.State) -> tuple[eqx.Module, Any]:
  """``linear -> bn`` in inference mode as one layer: ``(folded linear, FoldedBatchNorm)``.

  With ``(mean, var)`` = ``bn.running_statistics(state)`` and per output
  channel ``m = weight / sqrt(var + eps)`` (``weight = 1`` without
  ``channelwise_affine``), the linear layer's weight becomes ``W * m`` and its
  bias ``(b - mean) * m + bias``; a layer without a bias keeps none, and the
  returned `FoldedBatchNorm` adds that offset instead. Put both in the model
  in place of the pair, e.g.::

    model = eqx.tree_at(
      lambda m: (m.conv1, m.bn1), model, fold_pair(model.conv1, model.bn1, state)
    )

  Models are plain Python calls in Equinox, so which layer feeds which BN
  layer is the caller's to say: there is no automatic ``fold`` of a whole
  model, as `jaxbn.folding.fold` does for Flax.

  Args:
    linear: an ``eqx.nn.Linear`` or a convolution (``eqx.nn.Conv*``,
      ``eqx.nn.ConvTranspose*``): a layer whose weight has the output channels
      on axis 0 and whose bias is None or of shape ``(out, 1, ...)``.
    bn: the `BatchNorm` applied to its output, ``mode='batch'`` or ``'ema'``.
    state: the model's state (read, not changed).

  Raises:
    TypeError: for Equinox's own BatchNorm, or a ``linear`` without a weight of
      ``bn.input_size`` output channels on axis 0.
  """
  _batch_norms(bn)
  weight = getattr(linear, 'weight', None)
  if weight is None or weight.ndim < 2 or weight.shape[0] != bn.input_size:
    raise TypeError(
      f'fold_pair folds a BN layer of {bn.input_size} channels into an eqx.nn.Linear or '
      f'convolution with {bn.input_size} output channels, not {type(linear).__name__}.'
    )
  bias = getattr(linear, 'bias', None)
  mean, var = bn.running_statistics(state)
  params = {} if bn.weight is None else {'scale': bn.weight, 'bias': bn.bias}
  kernel, new_bias = fold_into_linear(
    jnp.moveaxis(weight, 0, -1),
    None if bias is None else bias.reshape(-1),
    params,
    {'mean': mean, 'var': var},
    bn.eps,
  )
  linear = eqx.tree_at(lambda m: m.weight, linear, jnp.moveaxis(kernel, -1, 0).astype(weight.dtype))
  if bias is None:
    return linear, FoldedBatchNorm(new_bias.astype(weight.dtype))
  linear = eqx.tree_at(lambda m: m.bias, linear, new_bias.reshape(bias.shape).astype(bias.dtype))
  return linear, FoldedBatchNorm()


def _recording(layer: BatchNorm) -> BatchNorm:
  """A copy of ``layer`` in training mode whose hidden averages take each batch's statistics."""
  if layer.mode != 'batch':
    raise ValueError(
      "precise_batch_stats supports mode='batch' layers: in mode='ema' the running "
      'averages are part of training itself.'
    )
  recording = copy.copy(layer)
  object.__setattr__(recording, '_record_batch_stats', True)
  object.__setattr__(recording, 'inference', False)
  return recording


def precise_batch_stats(
  apply: Callable[[Any, eqx.nn.State, jax.Array], tuple[Any, eqx.nn.State]],
  model: Any,
  state: eqx.nn.State,
  images: jax.Array,
  batch_size: int,
) -> eqx.nn.State:
  """A new state whose BN statistics are the average of the batch statistics ("precise BN").

  For each `BatchNorm` of ``model`` the statistics that inference mode
  normalises with (`BatchNorm.running_statistics`) become the equal-weight
  mean over the ``len(images) // batch_size`` full batches of the batch
  statistics it computes in training mode, with the weights of ``model``
  (as `jaxbn.precise.precise_batch_stats` for linen). Its ``batch_counter``
  is kept (the hidden averages are set to what, corrected after that many
  steps, gives those statistics); other state is kept.

  Args:
    apply: ``apply(model, state, batch) -> (outputs, state)``, the batched
      training forward, e.g. ``jax.vmap(model, axis_name='batch', in_axes=(0,
      None), out_axes=(0, None))(batch, state)``. It is called with a copy
      of ``model`` whose BN layers are in training mode and record.
    model: an Equinox model whose BN layers are `BatchNorm` (``mode='batch'``).
    state: its state; left valid and unchanged.
    images: (N, ...) training inputs.
    batch_size: examples per batch (the training batch size).

  Returns:
    The new state.

  Raises:
    TypeError: for Equinox's own BatchNorm in ``model``.
    ValueError: for a `BatchNorm` in ``mode='ema'``, or fewer than
      ``batch_size`` images.
  """
  layers = _batch_norms(model)
  is_bn = lambda m: isinstance(m, BatchNorm)
  recording = jax.tree.map(lambda m: _recording(m) if is_bn(m) else m, model, is_leaf=is_bn)

  @eqx.filter_jit
  def batch_stats(model, state, batch):
    _, state = apply(model, state, batch)
    return [state.get(layer.batch_state_index) for layer in layers]

  def clone(state):  # a State is invalidated by the State made from it
    return jax.tree.unflatten(*reversed(jax.tree.flatten(state)))

  average = _average(lambda batch: batch_stats(recording, clone(state), batch), images, batch_size)
  state = clone(state)
  for layer, stats in zip(layers, average, strict=True):
    # The inverse of BatchNorm._corrected: the start (0, 1) put back with its weight.
    w = layer._start_weight(state.get(layer.batch_counter), stats[0].dtype)
    hidden = (stats[0] * (1 - w), stats[1] * (1 - w) + w)
    old = state.get(layer.batch_state_index)
    state = state.set(
      layer.batch_state_index, tuple(h.astype(o.dtype) for h, o in zip(hidden, old, strict=True))
    )
  return state
