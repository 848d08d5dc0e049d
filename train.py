r"""Trains LeNet with batch norm on Fashion-MNIST (Dive into Deep Learning, batch-norm chapter).

Usage:
  python train.py --config configs/lenet_bn.py [--workdir DIR] [--config.FIELD=VALUE ...]

Configs: configs/lenet_bn.py (from-scratch BN, lr 1.0; its comments describe every
field), configs/lenet_bn_flax.py (flax.linen.BatchNorm), configs/lenet.py (no BN, lr 0.9),
configs/lenet_bn_precise.py, configs/lenet_bn_per_device.py. Examples:
  python train.py --config configs/lenet_bn.py --config.num_epochs=2 --config.seed=1
  python train.py --config configs/lenet_bn.py --workdir runs/a   # rerun to resume
  python train.py --config configs/lenet_bn.py --config.bn.momentum=None  # cumulative average
  python train.py --config configs/lenet_bn.py --config.bn.virtual_batch_size=32  # ghost BN

The workdir (default workdirs/<config>-<time>) receives config.json, metrics.jsonl,
curves.png and orbax checkpoints; rerunning with the same --workdir and config
resumes from the last checkpoint. Trains data-parallel on all devices JAX finds
(GPUs if any; several hosts with --config.distributed.coordinator_address), with BN
statistics over the global batch (--config.bn.stats=global) or each device's block
(--config.bn.stats=per_device).
"""

import pathlib
import re
import sys
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from d2l_lenet import data, settings, trainer, workdir

config_flags.DEFINE_config_file(
  'config',
  None,
  'Path to a config file, e.g. configs/lenet_bn.py; override fields with --config.FIELD=VALUE.',
  lock_config=True,
)
flags.DEFINE_string(
  'workdir',
  None,
  'Directory for config, metrics, plot and checkpoints; reuse it to resume. '
  'Default: workdirs/<config name>-<date>-<time>.',
)
flags.mark_flags_as_required(['config'])
FLAGS = flags.FLAGS
CACHE_DIR = pathlib.Path.home() / '.cache' / 'jaxbn' / 'xla'


def main(argv):
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  if not jax.config.jax_compilation_cache_dir:
    # JAX's persistent cache: a rerun loads its compiled steps instead of
    # compiling them again (JAX_COMPILATION_CACHE_DIR chooses another place).
    jax.config.update('jax_compilation_cache_dir', str(CACHE_DIR))
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments {argv[1:]}: use --config.FIELD=VALUE.')
  config_path = pathlib.Path(flags.FLAGS['config'].config_filename)
  run_dir = FLAGS.workdir or f'workdirs/{config_path.stem}-{time.strftime("%Y%m%d-%H%M%S")}'
  print(f'config {config_path}, workdir {run_dir}')
  try:
    trainer.train_and_evaluate(FLAGS.config, run_dir)
  except (
    settings.ConfigError,
    data.DataNotFoundError,
    workdir.WorkdirError,
    FloatingPointError,
  ) as e:
    sys.exit(f'error: {e}')


def parse_flags(argv):
  """absl's parser, with a plain message (no traceback) for a bad --config or override."""
  try:
    args = FLAGS(argv)
    FLAGS.config.keys()  # the config file is loaded lazily; fail here if it cannot be
  except flags.Error as e:
    # A --config.FIELD value of the wrong type: absl names the flag, the rule says what fits.
    field = re.match(r'flag --config\.([\w.]+)=', str(e))
    if field and field[1] in settings.RULES:
      sys.exit(f'error: {e}; config.{field[1]} {settings.explain(field[1])}')
    sys.exit(f'error: {e}\nSee python train.py --help.')
  except (AttributeError, KeyError) as e:  # ml_collections: an unknown field
    text = str(e.args[0] if e.args else e).replace('\\n', '\n').replace("\\'", "'")
    field, *hint = text.strip('\'"').split('\n')
    hint = ' '.join(hint).strip('\'"')
    sys.exit(f"error: unknown config field '{field.strip(chr(39))}'. {hint}")
  except (TypeError, ValueError, OSError) as e:
    sys.exit(f'error: {e}\nSee python train.py --help.')
  return args


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
