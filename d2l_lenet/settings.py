"""The config of a run: every check of its values, and the model it describes.

`RULES` holds, for each dotted field of the configs in configs/, its type, its
range or choices and the value that turns it off. `validate_fields` checks a
config against them and against the combinations that need no device count,
before anything starts; `validate_config` adds the checks that need the
number of devices. A refused config raises a one-line `ConfigError` naming
the field, the value, the rule and a fix. `build_model` turns the checked
``config.api``, ``config.norm``, ``config.conv_impl`` and ``config.bn`` into a
`models.LeNet` (or `models.NNXLeNet`). See configs/lenet_bn.py for the fields.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
from collections.abc import Callable
from typing import Any

import ml_collections

from d2l_lenet import data, models, parallel


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field and a fix."""


_TYPE_WORDS = {bool: 'True or False', int: 'an integer', float: 'a finite number', str: 'a string'}


@dataclasses.dataclass(frozen=True)
class Rule:
  """What one config field may hold.

  A value passes if it has ``type`` (an int counts as a float; a bool as
  neither; no NaN or infinity) and then lies in [``low``, ``high``] (``low``
  itself excluded if ``above``), or is one of ``choices``, or matches
  ``pattern``. Besides those it may be ``off[0]`` (which means ``off[1]``),
  and None where ``none`` says what None means.
  """

  type: type  # bool, int, float or str
  example: str  # a good value, as --config.FIELD=EXAMPLE takes it
  low: float | None = None
  high: float | None = None
  above: bool = False
  choices: tuple[str, ...] = ()
  pattern: tuple[str, str] | None = None  # (regular expression, the form in words)
  off: tuple[Any, str] | None = None
  none: str = ''
  words: str = ''  # the type and range in words, where the generated ones read badly

  def accepts(self, value: Any) -> bool:
    """Whether ``value`` may be this field's."""
    if value is None:
      return bool(self.none)
    if self.type is bool or isinstance(value, bool):
      return self.type is bool and isinstance(value, bool)
    if self.type is str:
      if not isinstance(value, str):
        return False
      if (self.off and value == self.off[0]) or value in self.choices:
        return True
      if self.pattern:
        return re.fullmatch(self.pattern[0], value) is not None
      return not self.choices
    number = numbers.Integral if self.type is int else numbers.Real
    if not isinstance(value, number) or not math.isfinite(value):
      return False
    if self.off and value == self.off[0]:
      return True
    if self.low is not None and (value <= self.low if self.above else value < self.low):
      return False
    return self.high is None or value <= self.high

  def describe(self) -> str:
    """The rule in words, e.g. 'an integer >= 2, or 0 (off)'."""
    words = self.words or self._type_and_range()
    if self.off:
      words += f', or {self.off[0]!r} ({self.off[1]})'
    if self.none:
      words += f', or None ({self.none})'
    return words

  def _type_and_range(self) -> str:
    if self.choices or self.pattern:
      forms = [repr(c) for c in self.choices] + ([self.pattern[1]] if self.pattern else [])
      return ' or '.join(forms) if self.pattern else f'one of {self.choices}'
    words = _TYPE_WORDS[self.type]
    if self.low is not None and self.high is not None:
      return f'{words} in {"(" if self.above else "["}{self.low}, {self.high}]'
    if self.low is not None:
      return f'{words} {">" if self.above else ">="} {self.low}'
    return words if self.high is None else f'{words} <= {self.high}'


_FROM_CLUSTER = 'taken from the cluster environment'

# One rule per field of configs/lenet_bn.py (whose comments say what each
# field does); tests/test_settings.py proves every field of every config has one.
RULES: dict[str, Rule] = {
  'api': Rule(str, 'linen', choices=models.APIS),
  'norm': Rule(str, 'jaxbn', choices=models.NORMS),
  'conv_impl': Rule(str, 'auto', choices=models.CONV_IMPLS),
  'bn.momentum': Rule(float, '0.9', low=0, high=1, none='the cumulative average; jaxbn only'),
  'bn.epsilon': Rule(float, '1e-5', low=0, above=True),
  'bn.virtual_batch_size': Rule(int, '32', low=2, off=(0, 'off')),
  'bn.renorm_rmax': Rule(float, '3.0', low=1, off=(0, 'off')),
  'bn.renorm_dmax': Rule(float, '5.0', low=0),
  'bn.renorm_warmup_steps': Rule(int, '1000', low=0),
  'bn.stats': Rule(str, 'global', choices=parallel.BN_STATS),
  'bn.precise_examples': Rule(
    int, '60000', low=1, high=data.NUM_TRAIN, off=(0, 'keep the running averages')
  ),
  'learning_rate': Rule(float, '1.0', low=0, above=True),
  'batch_size': Rule(int, '256', low=1),
  'num_epochs': Rule(int, '10', low=1),
  'seed': Rule(int, '0', low=-(2**63), high=2**63 - 1, words='a 64-bit integer'),
  'steps_per_dispatch': Rule(int, '32', low=1, off=(0, 'a whole epoch per call')),
  'eval_batch_size': Rule(int, '2000', low=1),
  'progress_bar': Rule(bool, 'False'),
  'distributed.coordinator_address': Rule(
    str,
    'auto',
    choices=('auto',),
    pattern=(r'\S+:[0-9]{1,5}', "'host:port' of process 0"),
    off=('', 'one process'),
  ),
  'distributed.num_processes': Rule(int, '2', low=1, off=(0, _FROM_CLUSTER)),
  'distributed.process_id': Rule(int, '0', low=0, off=(-1, _FROM_CLUSTER)),
  'data.data_dir': Rule(
    str, '/tmp/tfds', words='a path', off=('', '$TFDS_DATA_DIR or ~/tensorflow_datasets')
  ),
  'data.idx_dir': Rule(str, data.DEBIAN_IDX_DIR, words='a path', off=('', 'no IDX files')),
  'data.download': Rule(bool, 'True'),
  'data.num_train': Rule(int, '1024', low=1, high=data.NUM_TRAIN, off=(0, 'all')),
  'data.num_test': Rule(int, '1000', low=1, high=data.NUM_TEST, off=(0, 'all')),
}


def explain(field: str) -> str:
  """The rule of the dotted ``field`` and a fix: 'must be ...: e.g. --config.FIELD=...'."""
  rule = RULES[field]
  return f'must be {rule.describe()}: e.g. --config.{field}={rule.example}.'


def validate_fields(config: ml_collections.ConfigDict) -> None:
  """Raises `ConfigError` for a field against `RULES`, or a combination that cannot work.

  Needs no device count: run it before start-up, data or compilation.
  """
  for field, rule in RULES.items():
    value = config[field]
    if not rule.accepts(value):
      if rule.choices and not rule.pattern and isinstance(value, str):
        raise ConfigError(f'config.{field}={value!r} is unknown: use one of {rule.choices}.')
      raise ConfigError(f'config.{field}={value!r} {explain(field)}')
  _check_bn(config.norm, config.bn)
  _check_distributed(config.distributed)
  _check_sizes(config)


def validate_config(
  config: ml_collections.ConfigDict, num_devices: int = 1, masked: bool = False
) -> None:
  """Raises `ConfigError` for values that cannot train, before any work is done.

  `validate_fields`, then the checks of the batch against the devices.

  Args:
    config: the run's config.
    num_devices: devices of the mesh that the global batch is split over.
    masked: whether training batches carry a 'mask' of real examples (the
      trainer's never do; `parallel.make_train_step`'s may).
  """
  validate_fields(config)
  _check_batches(config, num_devices, masked)


def _check_bn(norm: str, bn: ml_collections.ConfigDict) -> None:
  if not bn.renorm_rmax:
    for field in ('renorm_dmax', 'renorm_warmup_steps'):
      if bn[field]:
        raise ConfigError(
          f'config.bn.{field}={bn[field]!r} has no effect: batch renormalization is off '
          f'(config.bn.renorm_rmax=0). Set renorm_rmax >= 1 to use it, or {field} to 0.'
        )
  if bn.precise_examples and norm == 'none':
    raise ConfigError(
      f'config.bn.precise_examples={bn.precise_examples} has no effect without batch norm: '
      "set it to 0 for norm='none'."
    )
  jaxbn_only = {
    'momentum': bn.momentum is None,
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


def _check_distributed(distributed: ml_collections.ConfigDict) -> None:
  # `parallel.initialize_distributed` reads the other two fields only with an address.
  if not distributed.coordinator_address:
    for field, default in (('num_processes', 0), ('process_id', -1)):
      if distributed[field] != default:
        raise ConfigError(
          f'config.distributed.{field}={distributed[field]!r} has no effect without '
          'config.distributed.coordinator_address: the run would start as one process. '
          "Set coordinator_address to 'host:port' of process 0 (or 'auto' on a cluster), "
          f'or {field} to {default}.'
        )
  num_processes, process_id = distributed.num_processes, distributed.process_id
  if num_processes and process_id >= num_processes:
    raise ConfigError(
      f'config.distributed.process_id={process_id} is not one of the {num_processes} processes '
      f'of config.distributed.num_processes: use 0 to {num_processes - 1}, or -1 to take it '
      'from the cluster environment.'
    )


def _check_sizes(config: ml_collections.ConfigDict) -> None:
  batch_size, precise_examples = config.batch_size, config.bn.precise_examples
  num_train = config.data.num_train or data.NUM_TRAIN
  if batch_size > num_train:
    raise ConfigError(
      f'config.batch_size={batch_size} is larger than the {num_train} training '
      'examples: lower it or use more data (config.data.num_train=0 takes all).'
    )
  if 0 < precise_examples < batch_size:
    raise ConfigError(
      f'config.bn.precise_examples={precise_examples} is less than one batch of '
      f'config.batch_size={batch_size}: precise statistics average whole batches.'
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
  if vbs and per_device % vbs:
    raise ConfigError(
      f'config.bn.virtual_batch_size={vbs} must divide the {per_device} '
      f'examples of each of the {num_devices} device(s) (config.batch_size={batch_size}): '
      'use a divisor of batch_size / devices (0 turns ghost batch norm off).'
    )
  if masked and config.norm == 'flax' and bn.stats == 'global' and num_devices > 1:
    raise ConfigError(
      "config.norm='flax' with masked batches and bn.stats='global': flax.linen.BatchNorm "
      'averages per-device means, which is wrong when devices hold different numbers of '
      "real examples (flax issue 2417). Use config.norm='jaxbn'."
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
