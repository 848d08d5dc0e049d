"""d2l_lenet.settings: a refused config names the field and the fix; the model follows it."""

import pathlib

import jax
import pytest
from absl import flags
from flax import linen as nn
from ml_collections import config_flags

import jaxbn
from configs import lenet_bn
from d2l_lenet import parallel, settings

ROOT = pathlib.Path(__file__).resolve().parents[1]


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
    ({'learning_rate': 0.0}, 1, r'config.learning_rate=0.0 must be positive'),
    ({'batch_size': -4}, 1, r'config.batch_size=-4 must be positive'),
    ({'num_epochs': 0}, 1, r'config.num_epochs=0 must be positive'),
    ({'batch_size': 1}, 1, r'single value per feature'),
    ({'bn.momentum': 1.5}, 1, r'config.bn.momentum=1.5 must be in \[0, 1\]'),
    ({'bn.momentum': 'fast'}, 1, r"config.bn.momentum='fast' must be in \[0, 1\]"),
    ({'bn.stats': 'sync'}, 1, r"config.bn.stats='sync' is unknown"),
    ({'norm': 'flax', 'bn.momentum': None}, 1, r'bn.momentum=None is an option of jaxbn'),
    ({'norm': 'flax', 'bn.virtual_batch_size': 32}, 1, r'bn.virtual_batch_size=32 is an'),
    ({'norm': 'none', 'bn.renorm_rmax': 3.0}, 1, r'bn.renorm_rmax=3.0 is an option of jaxbn'),
    ({'bn.renorm_rmax': 0.5}, 1, r'renormalization needs renorm_rmax >= 1'),
    ({'norm': 'none', 'bn.precise_examples': 10}, 1, r'precise_examples needs batch norm'),
    ({'bn.virtual_batch_size': 3}, 1, r'virtual_batch_size=3 must be at least 2 and divide'),
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
