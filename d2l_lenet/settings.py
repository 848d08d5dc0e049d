"""The config of a run: every check of its values, and the model it describes.

`validate_config` is the one place that refuses a config (a `ConfigError`
naming the field and the fix), before any work is done; `build_model` turns
the checked ``config.api``, ``config.norm``, ``config.conv_impl`` and
``config.bn`` into a `models.LeNet` (or `models.NNXLeNet`). See configs/lenet_bn.py for the fields.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable

import ml_collections

from d2l_lenet import data, models, parallel


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field and a fix."""


def validate_config(
  config: ml_collections.ConfigDict, num_devices: int = 1, masked: bool = False
) -> None:
  """Raises `ConfigError` for values that cannot train, before any work is done.

  Args:
    config: the run's config.
    num_devices: devices of the mesh that the global batch is split over.
    masked: whether training batches carry a 'mask' of real examples (the
      trainer's never do; `parallel.make_train_step`'s may).
  """
  _check_fields(config)
  _check_bn(config.norm, config.bn)
  _check_batches(config, num_devices, masked)


def _check_fields(config: ml_collections.ConfigDict) -> None:
  if config.api not in models.APIS:
    raise ConfigError(f'config.api={config.api!r} is unknown: use one of {models.APIS}.')
  if config.norm not in models.NORMS:
    raise ConfigError(f'config.norm={config.norm!r} is unknown: use one of {models.NORMS}.')
  if config.conv_impl not in models.CONV_IMPLS:
    raise ConfigError(
      f'config.conv_impl={config.conv_impl!r} is unknown: use one of {models.CONV_IMPLS}.'
    )
  for field in ('learning_rate', 'batch_size', 'num_epochs', 'eval_batch_size'):
    if not config[field] > 0:
      raise ConfigError(f'config.{field}={config[field]!r} must be positive.')
  for field in ('batch_size', 'num_epochs', 'eval_batch_size', 'steps_per_dispatch'):
    if not isinstance(config[field], int):
      raise ConfigError(f'config.{field}={config[field]!r} must be an integer.')
  if config.bn.stats not in parallel.BN_STATS:
    raise ConfigError(
      f'config.bn.stats={config.bn.stats!r} is unknown: use one of {parallel.BN_STATS}.'
    )


def _check_bn(norm: str, bn: ml_collections.ConfigDict) -> None:
  momentum = bn.momentum
  if momentum is not None and not (isinstance(momentum, numbers.Real) and 0.0 <= momentum <= 1.0):
    raise ConfigError(
      f'config.bn.momentum={momentum!r} must be in [0, 1] (the decay of the running '
      'averages), or None for the cumulative average.'
    )
  if bn.renorm_rmax and (bn.renorm_rmax < 1 or bn.renorm_dmax < 0):
    raise ConfigError(
      f'config.bn.renorm_rmax={bn.renorm_rmax} and renorm_dmax={bn.renorm_dmax}: batch '
      'renormalization needs renorm_rmax >= 1 and renorm_dmax >= 0 (renorm_rmax=0 turns it off).'
    )
  if bn.precise_examples and norm == 'none':
    raise ConfigError("config.bn.precise_examples needs batch norm: set it to 0 for norm='none'.")
  jaxbn_only = {
    'momentum': momentum is None,
    'virtual_batch_size': bn.virtual_batch_size,
    'renorm_rmax': bn.renorm_rmax,
  }
  for field, used in jaxbn_only.items():
    if used and norm != 'jaxbn':
      raise ConfigError(
        f'config.bn.{field}={bn[field]!r} is an option of jaxbn.BatchNorm only '
        f"(config.norm={norm!r} has no such option): use config.norm='jaxbn', or "
        'leave the field at its default.'
      )


def _check_batches(config, num_devices: int, masked: bool) -> None:
  batch_size, bn = config.batch_size, config.bn
  if batch_size % num_devices:
    raise ConfigError(
      f'config.batch_size={batch_size} is not divisible by the {num_devices} devices: '
      f'each takes an equal block of the global batch. Use a multiple of {num_devices}.'
    )
  per_device = batch_size // num_devices
  # The examples each BN layer normalises together.
  normalised = per_device if bn.stats == 'per_device' else batch_size
  if normalised == 1 and config.norm != 'none':
    raise ConfigError(
      f'config.batch_size={batch_size} on {num_devices} device(s) with bn.stats={bn.stats!r}: '
      'the dense layers would normalise a single value per feature and learn nothing. '
      "Use a larger batch_size, or norm='none'."
    )
  vbs = bn.virtual_batch_size
  if vbs and (vbs < 2 or per_device % vbs):
    raise ConfigError(
      f'config.bn.virtual_batch_size={vbs} must be at least 2 and divide the {per_device} '
      f'examples of each of the {num_devices} device(s) (config.batch_size={batch_size}): '
      'use a divisor of batch_size / devices (0 turns ghost batch norm off).'
    )
  if masked and config.norm == 'flax' and bn.stats == 'global' and num_devices > 1:
    raise ConfigError(
      "config.norm='flax' with masked batches and bn.stats='global': flax.linen.BatchNorm "
      'averages per-device means, which is wrong when devices hold different numbers of '
      "real examples (flax issue 2417). Use config.norm='jaxbn'."
    )
  num_train = (
    config.data.num_train if 0 < config.data.num_train < data.NUM_TRAIN else data.NUM_TRAIN
  )
  if batch_size > num_train:
    raise ConfigError(
      f'config.batch_size={batch_size} is larger than the {num_train} training '
      'examples: lower it or use more data (config.data.num_train=0 takes all).'
    )
  if 0 < bn.precise_examples < batch_size:
    raise ConfigError(
      f'config.bn.precise_examples={bn.precise_examples} is less than one batch of '
      f'config.batch_size={batch_size}: precise statistics average whole batches.'
    )


def build_model(
  config: ml_collections.ConfigDict, axis_name: str | None = None
) -> models.LeNet | Callable[..., models.NNXLeNet]:
  """The LeNet of ``config`` (`validate_config` first).

  With ``config.api='linen'`` a `models.LeNet`; with ``'nnx'`` the constructor
  of a `models.NNXLeNet`, which `steps.create_train_state` calls with its
  random numbers. ``axis_name``: the mesh axis over which the BN layers
  average their batch statistics (synchronized BN; see
  `parallel.bn_axis_name`), or None.
  """
  bn = config.bn
  options = {}
  if config.norm == 'jaxbn':
    options = dict(
      virtual_batch_size=bn.virtual_batch_size or None,
      renorm_clip=(bn.renorm_rmax, bn.renorm_dmax) if bn.renorm_rmax else None,
      renorm_warmup_steps=bn.renorm_warmup_steps,
    )
  norm = models.norm_layer(
    config.norm,
    config.api,
    momentum=bn.momentum,
    epsilon=bn.epsilon,
    axis_name=axis_name,
    **options,
  )
  if config.api == 'nnx':
    return functools.partial(models.NNXLeNet, norm, conv_impl=config.conv_impl)
  return models.LeNet(norm=norm, conv_impl=config.conv_impl)
