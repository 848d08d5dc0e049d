"""d2l_lenet.settings: a refused config names the field and the fix; the model follows it."""

import ast
import importlib
import math
import pathlib

import jax
import ml_collections
import pytest
from absl import flags
from flax import linen as nn
from ml_collections import config_flags

import jaxbn
from configs import lenet_bn
from d2l_lenet import data, parallel, settings, trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / 'configs').glob('*.py') if p.stem != '__init__')


def config_for(**overrides):
  """configs/lenet_bn.py with ``overrides`` of dotted fields, e.g. ``{'bn.stats': 'x'}``."""
  config = lenet_bn.get_config()
  config.update_from_flattened_dict(overrides)
  return config


@pytest.mark.parametrize(
  'overrides, num_devices, pattern',
  [
    ({'norm': 'group'}, 1, r"config.norm='group' is unknown"),
    ({'api': 'haiku'}, 1, r"config.api='haiku' is unknown"),
    ({'conv_impl': 'fast'}, 1, r"config.conv_impl='fast' is unknown"),
    ({'learning_rate': 0.0}, 1, r'config.learning_rate=0.0 must be a finite number > 0'),
    ({'batch_size': -4}, 1, r'config.batch_size=-4 must be an integer >= 1'),
    ({'num_epochs': 0}, 1, r'config.num_epochs=0 must be an integer >= 1'),
    ({'batch_size': 1}, 1, r'single value per feature'),
    ({'bn.momentum': 1.5}, 1, r'config.bn.momentum=1.5 must be a finite number in \[0, 1\]'),
    ({'bn.momentum': 'fast'}, 1, r"config.bn.momentum='fast' must be a finite number in \[0, 1\]"),
    ({'bn.momentum': True}, 1, r'config.bn.momentum=True must be a finite number in \[0, 1\]'),
    ({'bn.stats': 'sync'}, 1, r"config.bn.stats='sync' is unknown"),
    ({'norm': 'flax', 'bn.momentum': None}, 1, r'bn.momentum=None is an option of jaxbn'),
    ({'norm': 'flax', 'bn.virtual_batch_size': 32}, 1, r'bn.virtual_batch_size=32 is an'),
    ({'norm': 'none', 'bn.renorm_rmax': 3.0}, 1, r'bn.renorm_rmax=3.0 is an option of jaxbn'),
    ({'bn.renorm_rmax': 0.5}, 1, r'renorm_rmax=0.5 must be a finite number >= 1, or 0 \(off\)'),
    ({'bn.renorm_dmax': 5.0}, 1, r'renorm_dmax=5.0 has no effect: batch renormalization is off'),
    ({'bn.renorm_warmup_steps': 9}, 1, r'renorm_warmup_steps=9 has no effect: batch renorm'),
    ({'norm': 'none', 'bn.precise_examples': 10}, 1, r'precise_examples=10 has no effect without'),
    ({'bn.virtual_batch_size': 1}, 1, r'virtual_batch_size=1 must be an integer >= 2, or 0'),
    ({'bn.virtual_batch_size': 3}, 1, r'virtual_batch_size=3 must divide the 256 examples'),
    # The three cases of issue 27, which once reached training.
    ({'bn.epsilon': -1.0}, 1, r'config.bn.epsilon=-1.0 must be a finite number > 0'),
    ({'steps_per_dispatch': -3}, 1, r'steps_per_dispatch=-3 must be an integer >= 1, or 0'),
    (
      {'distributed.num_processes': 2},
      1,
      r'num_processes=2 has no effect without config.distributed.coordinator_address',
    ),
    ({'distributed.process_id': 0}, 1, r'process_id=0 has no effect without'),
    (
      {
        'distributed.coordinator_address': 'h:1',
        'distributed.num_processes': 2,
        'distributed.process_id': 2,
      },
      1,
      r'process_id=2 is not one of the 2 processes',
    ),
    ({'data.num_train': 60001}, 1, r'num_train=60001 must be an integer in \[1, 60000\], or 0'),
    ({'data.num_train': 100}, 1, r'batch_size=256 is larger than the 100 training'),
    ({'bn.precise_examples': 100}, 1, r'precise_examples=100 is less than one batch'),
    ({'batch_size': 12}, 8, r'batch_size=12 is not divisible by the 8 devices'),
    # 32 examples over 8 devices: blocks of 4, which virtual batches of 8 cannot split.
    ({'batch_size': 32, 'bn.virtual_batch_size': 8}, 8, r'divide the 4 examples of each'),
    ({'batch_size': 8, 'bn.stats': 'per_device'}, 8, r'single value per feature'),
  ],
)
def test_bad_config_values_are_named(overrides, num_devices, pattern):
  with pytest.raises(settings.ConfigError, match=pattern):
    settings.validate_config(config_for(**overrides), num_devices=num_devices)


def test_flax_batchnorm_with_masks_and_global_statistics_is_refused():
  """flax issue 2417: flax.linen.BatchNorm averages per-device means over unequal counts."""
  config = config_for(norm='flax', batch_size=32)
  with pytest.raises(settings.ConfigError, match='flax issue 2417'):
    settings.validate_config(config, num_devices=8, masked=True)
  settings.validate_config(config, num_devices=8)  # without masks it is right
  settings.validate_config(config, num_devices=1, masked=True)  # one device: one mean
  config.bn.stats = 'per_device'
  settings.validate_config(config, num_devices=8, masked=True)


def test_good_configs_pass():
  settings.validate_config(config_for(norm='none', batch_size=1))  # no BN: batch 1 is fine
  settings.validate_config(config_for(**{'bn.momentum': None}))
  settings.validate_config(config_for(**{'bn.momentum': 1}))
  settings.validate_config(config_for(batch_size=32, **{'bn.virtual_batch_size': 4}), 8)
  settings.validate_config(config_for(**{'bn.renorm_rmax': 1, 'bn.renorm_dmax': 0}))
  settings.validate_config(config_for(**{'distributed.coordinator_address': 'auto'}))
  cluster = {'coordinator_address': '10.0.0.1:1234', 'num_processes': 2, 'process_id': 1}
  settings.validate_config(config_for(**{f'distributed.{k}': v for k, v in cluster.items()}))
  settings.validate_config(config_for(seed=-(2**63), **{'data.num_train': 60000}))


def parse_config_flags(*args):
  """The config that ``train.py --config=configs/lenet_bn.py ARGS`` would get."""
  argv = ['train.py', f'--config={ROOT / "configs" / "lenet_bn.py"}', *args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file(
    'config', flag_values=flag_values, lock_config=True, sys_argv=argv
  )
  flag_values(argv)
  return flag_values.config


# ml_collections loads the config file with the deprecated SourceFileLoader.load_module.
@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')
def test_momentum_none_from_the_command_line():
  assert parse_config_flags('--config.bn.momentum=None').bn.momentum is None
  assert parse_config_flags('--config.bn.momentum=0.5').bn.momentum == 0.5
  assert parse_config_flags().bn.momentum == 0.9


def test_the_model_takes_the_bn_options_of_the_config():
  config = config_for(
    conv_impl='standard',
    **{
      'bn.momentum': None,
      'bn.epsilon': 1e-3,
      'bn.virtual_batch_size': 4,
      'bn.renorm_rmax': 3.0,
      'bn.renorm_dmax': 5.0,
      'bn.renorm_warmup_steps': 10,
    },
  )
  model = settings.build_model(config, axis_name=parallel.DATA)
  assert model.conv_impl == 'standard'
  assert model.norm.func is jaxbn.BatchNorm
  assert model.norm.keywords == {
    'momentum': None,
    'epsilon': 1e-3,
    'axis_name': parallel.DATA,
    'virtual_batch_size': 4,
    'renorm_clip': (3.0, 5.0),
    'renorm_warmup_steps': 10,
  }
  # momentum=None reaches the layer: it keeps the count of averaged batches.
  variables = model.init(jax.random.key(0), jax.numpy.zeros((1, 28, 28, 1)), train=False)
  assert 'count' in variables['batch_stats']['bn1']


def test_the_flax_and_plain_models():
  flax_model = settings.build_model(config_for(norm='flax'))
  assert flax_model.norm.func is nn.BatchNorm and flax_model.norm.keywords['momentum'] == 0.9
  assert settings.build_model(config_for(norm='none')).norm is None


def test_bn_axis_name_follows_the_mesh_and_the_stats_mode():
  one = parallel.make_mesh(jax.devices()[:1])
  assert parallel.bn_axis_name(one, 'global') is None  # one device: no collectives
  assert parallel.bn_axis_name(one, 'per_device') is None


def load_config(name):
  return importlib.import_module(f'configs.{name}').get_config()


def leaf_fields(config, prefix=''):
  """The dotted name of every field of ``config`` that holds a value."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from leaf_fields(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}'


@pytest.mark.parametrize('name', CONFIGS)
def test_every_field_of_every_config_has_a_rule(name):
  """A new field without a rule in settings.RULES fails here (and a rule without a field)."""
  config = load_config(name)
  assert sorted(leaf_fields(config)) == sorted(settings.RULES)
  settings.validate_config(config)


@pytest.mark.parametrize('field', sorted(settings.RULES))
def test_each_rule_takes_its_example_and_its_off_value(field):
  rule = settings.RULES[field]
  example = rule.example if rule.type is str else ast.literal_eval(rule.example)
  assert rule.accepts(example), example
  if rule.off:
    assert rule.accepts(rule.off[0])
  assert rule.accepts(None) == bool(rule.none)


# Values of the wrong type for a field of each type; None where None means nothing.
WRONG_TYPES = {
  bool: [1, 'yes', 0.0, None],
  int: [2.5, '3', True, None],
  float: ['0.1', True, None],
  str: [3, 1.5, False, None],
}


# The spec held apart from settings.RULES, so that a rule loosened there
# fails here: the numeric fields that take 0 (a count, or the value meaning
# off) and the one that takes any negative value. Every other numeric field
# must refuse 0 and -2.
ZERO_IS_GOOD = {
  'bn.momentum', 'bn.virtual_batch_size', 'bn.renorm_rmax', 'bn.renorm_dmax',
  'bn.renorm_warmup_steps', 'bn.precise_examples', 'seed', 'steps_per_dispatch',
  'distributed.num_processes', 'distributed.process_id', 'data.num_train', 'data.num_test',
}  # fmt: skip
NEGATIVE_IS_GOOD = {'seed'}


def bad_values(field):
  """(kind, value): every kind of bad value that applies to ``field``."""
  rule = settings.RULES[field]
  values = [('wrong type', v) for v in WRONG_TYPES[rule.type] if not (v is None and rule.none)]
  if rule.type is float:
    values += [('NaN', math.nan), ('infinity', math.inf), ('infinity', -math.inf)]
  if rule.type in (int, float):
    values += [('zero', 0)] if field not in ZERO_IS_GOOD else []
    values += [('negative', -2)] if field not in NEGATIVE_IS_GOOD else []
    step = 1 if rule.type is int else 0.5
    if rule.low is not None:
      below = rule.low if rule.above else rule.low - step
      if not (rule.off and below == rule.off[0]):
        values.append(('out of range', below))
    if rule.high is not None:
      values += [('out of range', rule.high + step), ('out of range', 10**30)]
  if rule.choices:
    values.append(('unknown name', 'no-such-name'))
  if rule.pattern:
    values += [('unknown name', 'localhost'), ('unknown name', 'host:port')]
  return values


def test_the_spec_of_zero_and_negative_values_names_numeric_fields():
  numeric = {f for f, rule in settings.RULES.items() if rule.type in (int, float)}
  assert ZERO_IS_GOOD | NEGATIVE_IS_GOOD <= numeric
  for field in ZERO_IS_GOOD:
    assert settings.RULES[field].accepts(0), field


def no_distributed_start(config):
  return not config.distributed.coordinator_address


# Values that are good on their own but cannot take effect in a config where
# the condition holds: fields read only in some modes.
NO_EFFECT = {
  'distributed.num_processes': (2, no_distributed_start),
  'distributed.process_id': (0, no_distributed_start),
  'bn.renorm_dmax': (5.0, lambda config: not config.bn.renorm_rmax),
  'bn.renorm_warmup_steps': (100, lambda config: not config.bn.renorm_rmax),
  'bn.precise_examples': (60000, lambda config: config.norm == 'none'),
  'bn.momentum': (None, lambda config: config.norm != 'jaxbn'),
  'bn.virtual_batch_size': (32, lambda config: config.norm != 'jaxbn'),
  'bn.renorm_rmax': (3.0, lambda config: config.norm != 'jaxbn'),
}


def with_value(config, field, value):
  """A copy of ``config`` with ``field`` set to ``value`` as it is.

  Built from a dict: assigning would let ml_collections refuse some values
  (as the command line does) and convert others (True to 1.0 in a float
  field); the check must not depend on either.
  """
  tree = config.to_dict()
  *parents, leaf = field.split('.')
  node = tree
  for parent in parents:
    node = node[parent]
  node[leaf] = value
  return ml_collections.ConfigDict(tree)


def snapshot(directory):
  """Every file under ``directory`` with its bytes and modification time."""
  return {
    str(p.relative_to(directory)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
    for p in sorted(directory.rglob('*'))
  }


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """A workdir as a finished run of configs/lenet_bn.py leaves it (contents stand-ins)."""
  workdir = tmp_path_factory.mktemp('finished-run')
  config = lenet_bn.get_config()
  del config.distributed  # the trainer records the run's fields, not its start-up
  (workdir / 'config.json').write_text(config.to_json_best_effort())
  (workdir / 'metrics.jsonl').write_text('{"epoch": 1, "test_accuracy": 0.8}\n')
  (workdir / 'checkpoints' / '1').mkdir(parents=True)
  (workdir / 'checkpoints' / '1' / 'state').write_bytes(b'weights')
  return workdir


@pytest.mark.parametrize(
  'name, field', [(name, field) for name in CONFIGS for field in leaf_fields(load_config(name))]
)
def test_every_bad_value_of_every_field_is_refused_before_the_run_starts(
  name, field, finished_run, monkeypatch
):
  """Each kind of bad value, one at a time: a one-line error naming the field and the value.

  Through `trainer.train_and_evaluate`, into a workdir that holds a run: the
  refusal comes before the distributed start-up, before anything is written
  there, and before data is loaded or anything compiled.
  """

  def too_late(*args, **kwargs):
    raise AssertionError(f'the run started with a bad config.{field}')

  monkeypatch.setattr(parallel, 'initialize_distributed', too_late)
  monkeypatch.setattr(data, 'load_fashion_mnist', too_late)
  assert field in settings.RULES, f'config.{field} of configs/{name}.py has no rule'
  before = snapshot(finished_run)
  drawn = bad_values(field)
  value, condition = NO_EFFECT.get(field, (None, lambda config: False))
  if condition(load_config(name)):
    drawn.append(('cannot take effect', value))
  assert drawn
  for kind, value in drawn:
    config = with_value(load_config(name), field, value)
    with pytest.raises(settings.ConfigError) as refusal:
      trainer.train_and_evaluate(config, finished_run)
    message = str(refusal.value)
    assert message.startswith(f'config.{field}={value!r} '), (kind, message)
    if kind != 'cannot take effect':  # those name the field that would let it act
      assert settings.RULES[field].describe() in message
    assert '\n' not in message
    assert snapshot(finished_run) == before


def test_the_nan_stop_names_every_likely_cause(tmp_path):
  config = config_for(**{'bn.epsilon': 1e-30, 'progress_bar': False})
  meter = trainer._EpochMeter(1, config, 2, tmp_path)
  nan = jax.numpy.array([jax.numpy.nan, 0.5])
  with pytest.raises(FloatingPointError) as stop:
    meter.add({'loss': nan, 'accuracy': nan}, 0)
  message = str(stop.value)
  assert 'loss became nan at epoch 1, step 1 of 2' in message
  for cause in ('config.learning_rate=1.0', 'config.bn.epsilon=1e-30', 'config.data.data_dir'):
    assert cause in message
  assert 'bn.epsilon' not in trainer._likely_causes(config_for(norm='none'))
